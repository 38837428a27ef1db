"""The fused fold kernels: one pass computes ``acc + Σ cᵢ·wᵢ``, stores it and says whether a
value was not finite.

Why fused: a fold is memory-bound. Reading the update, the accumulator and writing the result in
one pass (with the NaN/Inf probe riding along) is the least memory traffic a fold can have; a
numpy expression would make a temporary and a second pass for the check.

fastmath: only "reassoc" (lets LLVM vectorise the NaN-probe sum z) and "contract" (FMA for
a + c·w: one rounding instead of two). No nnan/ninf: NaN and Inf keep their meaning, and x·0
stays NaN for x = ±Inf/NaN, so z != z iff some value was not finite.

Every kernel works on ``[s, e)`` of flat arrays and releases the GIL, so threads can split a
pass (:func:`executor`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

FAST = (np.dtype(np.float32), np.dtype(np.float64))  # dtypes the kernels take
KERNEL_CHUNK = 1 << 20  # elements per fused-kernel call (no scratch; bounds call overhead)

try:
    import numba

    _FM = {"reassoc", "contract"}

    _KERNEL = {"nogil": True, "cache": True, "boundscheck": False, "fastmath": _FM}
    _BODY = {"inline": "always", "boundscheck": False, "fastmath": _FM}

    # The loops below read ``a`` and write ``o``. The kernels pass views of two arrays, or (in
    # place, ``_ip``: ``out`` is the accumulator, the round endpoint's one accumulator) one view
    # twice. Inlined, the in-place kernels see one pointer: had they passed ``acc`` and ``out``
    # as two arguments, LLVM's runtime overlap check would fail and the loop run scalar, 3-5x
    # slower than ``np.add`` (measured: k_add4 29 ms vs 9 ms over 11.2 M floats). Same
    # arithmetic in the same order either way: the results are bit-identical.
    @numba.njit(**_BODY)
    def _add1(a, o, src, scale, n):  # pragma: no cover - compiled
        zero = scale - scale  # typed like the accumulator: keeps the loop in one vector width
        z = zero
        for i in range(n):
            x = a[i] + scale * src[i]
            o[i] = x
            z += x * zero
        return z != z

    @numba.njit(**_KERNEL)
    def k_add(acc, src, scale, out, s, e):  # pragma: no cover - compiled
        # 0-based views: LLVM vectorises this form, not acc[i] / src[i - s]
        return _add1(acc[s:e], out[s:e], src, scale, e - s)

    @numba.njit(**_KERNEL)
    def k_add_ip(out, src, scale, s, e):  # pragma: no cover - compiled
        o = out[s:e]
        return _add1(o, o, src, scale, e - s)

    @numba.njit(**_KERNEL)
    def k_first(src, scale, out, s, e):  # pragma: no cover - compiled
        o = out[s:e]
        zero = scale - scale
        z = zero
        for i in range(e - s):
            x = scale * src[i]
            o[i] = x
            z += x * zero
        return z != z

    @numba.njit(**_KERNEL)
    def k_scan(src, scale, s, e):  # pragma: no cover - compiled
        v = src[s:e]
        zero = scale - scale
        z = zero
        for i in range(e - s):
            z += (scale * v[i]) * zero
        return z != z

    # several queued updates in one pass: the accumulator is read and written once per group;
    # ``d`` divides the result (1: exact no-op; Σn in a round's last pass, which then needs no
    # division pass of its own -- the pass is memory-bound, the division costs nothing)
    @numba.njit(**_BODY)
    def _add4(a, o, w1, c1, w2, c2, w3, c3, w4, c4, n, first, d):  # pragma: no cover
        zero = c1 - c1
        z = zero
        for i in range(n):
            x = c1 * w1[i] + c2 * w2[i] + c3 * w3[i] + c4 * w4[i]
            if not first:
                x += a[i]
            o[i] = x  # stored first: the division sees the accumulator's rounding of x
            o[i] = o[i] / d
            z += x * zero
        return z != z

    @numba.njit(**_BODY)
    def _add3(a, o, w1, c1, w2, c2, w3, c3, n, first, d):  # pragma: no cover
        zero = c1 - c1
        z = zero
        for i in range(n):
            x = c1 * w1[i] + c2 * w2[i] + c3 * w3[i]
            if not first:
                x += a[i]
            o[i] = x
            o[i] = o[i] / d
            z += x * zero
        return z != z

    @numba.njit(**_BODY)
    def _add2(a, o, w1, c1, w2, c2, n, first, d):  # pragma: no cover
        zero = c1 - c1
        z = zero
        for i in range(n):
            x = c1 * w1[i] + c2 * w2[i]
            if not first:
                x += a[i]
            o[i] = x
            o[i] = o[i] / d
            z += x * zero
        return z != z

    @numba.njit(**_KERNEL)
    def k_add4(acc, w1, c1, w2, c2, w3, c3, w4, c4, out, s, e, first, d):  # pragma: no cover
        return _add4(acc[s:e], out[s:e], w1, c1, w2, c2, w3, c3, w4, c4, e - s, first, d)

    @numba.njit(**_KERNEL)
    def k_add3(acc, w1, c1, w2, c2, w3, c3, out, s, e, first, d):  # pragma: no cover
        return _add3(acc[s:e], out[s:e], w1, c1, w2, c2, w3, c3, e - s, first, d)

    @numba.njit(**_KERNEL)
    def k_add2(acc, w1, c1, w2, c2, out, s, e, first, d):  # pragma: no cover
        return _add2(acc[s:e], out[s:e], w1, c1, w2, c2, e - s, first, d)

    @numba.njit(**_KERNEL)
    def k_add4_ip(w1, c1, w2, c2, w3, c3, w4, c4, out, s, e, first, d):  # pragma: no cover
        o = out[s:e]
        return _add4(o, o, w1, c1, w2, c2, w3, c3, w4, c4, e - s, first, d)

    @numba.njit(**_KERNEL)
    def k_add3_ip(w1, c1, w2, c2, w3, c3, out, s, e, first, d):  # pragma: no cover
        o = out[s:e]
        return _add3(o, o, w1, c1, w2, c2, w3, c3, e - s, first, d)

    @numba.njit(**_KERNEL)
    def k_add2_ip(w1, c1, w2, c2, out, s, e, first, d):  # pragma: no cover
        o = out[s:e]
        return _add2(o, o, w1, c1, w2, c2, e - s, first, d)

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; keep a numpy path anyway
    HAVE_NUMBA = False

_WARM = [False]


def warm_kernels() -> None:
    """Load (or compile) the fused kernels for the common signatures now -- at aggregator start,
    not inside the first round's fold."""
    if _WARM[0] or not HAVE_NUMBA:
        return
    _WARM[0] = True
    for acc_dt in (np.float32, np.float64):
        acc = np.zeros(4, acc_dt)
        for src_dt in (np.float32, np.float64):
            for src in (np.ones(4, src_dt), np.frombuffer(np.ones(4, src_dt).tobytes(), src_dt)):
                sc = acc_dt(1)
                k_add(acc, src, sc, acc, 0, 4)
                k_add_ip(acc, src, sc, 0, 4)
                k_first(src, sc, acc, 0, 4)
                k_scan(src, sc, 0, 4)
                for first in (True, False):
                    k_add4(acc, src, sc, src, sc, src, sc, src, sc, acc, 0, 4, first, sc)
                    k_add3(acc, src, sc, src, sc, src, sc, acc, 0, 4, first, sc)
                    k_add2(acc, src, sc, src, sc, acc, 0, 4, first, sc)
                    k_add4_ip(src, sc, src, sc, src, sc, src, sc, acc, 0, 4, first, sc)
                    k_add3_ip(src, sc, src, sc, src, sc, acc, 0, 4, first, sc)
                    k_add2_ip(src, sc, src, sc, acc, 0, 4, first, sc)


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def executor(k: int) -> ThreadPoolExecutor:
    """Shared worker threads (the kernels and numpy ufuncs release the GIL, so chunks of one
    pass run in parallel)."""
    ex = _EXECUTORS.get(k)
    if ex is None:
        ex = _EXECUTORS[k] = ThreadPoolExecutor(max_workers=k, thread_name_prefix="fedavg-fold")
    return ex


def finite(t: np.ndarray) -> bool:
    """True if every value of ``t`` is finite: ``dot(t, t)`` is NaN/Inf iff a value is (or the
    sum overflows -- then an exact ``isfinite`` decides)."""
    s = np.dot(t, t) if t.dtype.kind == "f" and t.dtype.itemsize >= 4 else np.float64(0)
    if np.isfinite(s) and t.dtype.itemsize >= 4:
        return True
    return bool(np.isfinite(t).all())
