"""Eager folding: ``acc += n·w`` as each update arrives, reading the update in place.

Why chunks: ``n·w`` for a 233 MB layer would be a 233 MB temporary; we scale one chunk (1 MiB by
default, it stays in cache) into a reused scratch array and add it to the accumulator, so the only
model-sized buffers an aggregator owns are its accumulators.

Why two accumulators (``check="swap"``, the default): a NaN/Inf can sit in the last chunk of an
update, after the first chunks were already added. Instead of a second pass over the update we
write ``acc' = acc + n·w`` into the spare accumulator and swap on success; a bad chunk abandons
the spare and the live accumulator was never touched. Same memory traffic as in place, one extra
model of memory. ``check="precheck"`` keeps one accumulator and validates the update first (one
more read pass). Finite checks cost little: ``dot(t, t)`` of an in-cache chunk is NaN/Inf iff a
value is (or the sum overflows -- then an exact ``isfinite`` decides).

Only the top divides: an accumulator emits the unnormalised pair (Σnᵢwᵢ, Σnᵢ).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from hearth.functions.fedavg.pack import (
    Header,
    Layout,
    PackError,
    Payload,
    data_offset_for,
    header_bytes,
    parse,
    write_header,
)

DEFAULT_CHUNK = 1 << 18  # elements per numpy chunk (1 MiB of float32: scratch stays in cache)
KERNEL_CHUNK = 1 << 20  # elements per fused-kernel call (no scratch; bounds call overhead)
Alloc = Callable[[int], Any]  # nbytes -> writable buffer (bytearray, memoryview of a slot, ...)


class UpdateRejected(ValueError):
    """An update (or partial) cannot be folded; the accumulator is unchanged."""

    def __init__(self, message: str, client: str | None = None):
        super().__init__(message if client is None else f"update from {client!r}: {message}")
        self.client = client


try:  # fused kernels: one pass computes acc + n·w, stores it and checks finiteness
    import numba

    # fastmath: only "reassoc" (lets LLVM vectorise the NaN-probe sum z) and "contract" (FMA for
    # a + n·w: one rounding instead of two). No nnan/ninf: NaN and Inf keep their meaning, and
    # x·0 stays NaN for x = ±Inf/NaN, so z != z iff some value was not finite.
    _FM = {"reassoc", "contract"}

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FM)
    def _k_add(acc, src, scale, out, s, e):  # pragma: no cover - compiled
        a = acc[s:e]  # 0-based views: LLVM vectorises this form, not acc[i] / src[i - s]
        o = out[s:e]
        zero = scale - scale  # typed like the accumulator: keeps the loop in one vector width
        z = zero
        for i in range(e - s):
            x = a[i] + scale * src[i]
            o[i] = x
            z += x * zero
        return z != z

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FM)
    def _k_first(src, scale, out, s, e):  # pragma: no cover - compiled
        o = out[s:e]
        zero = scale - scale
        z = zero
        for i in range(e - s):
            x = scale * src[i]
            o[i] = x
            z += x * zero
        return z != z

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FM)
    def _k_scan(src, scale, s, e):  # pragma: no cover - compiled
        v = src[s:e]
        zero = scale - scale
        z = zero
        for i in range(e - s):
            z += (scale * v[i]) * zero
        return z != z

    # several queued updates in one pass: the accumulator is read and written once per group
    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FM)
    def _k_add4(acc, w1, c1, w2, c2, w3, c3, w4, c4, out, s, e, first):  # pragma: no cover
        a = acc[s:e]
        o = out[s:e]
        zero = c1 - c1
        z = zero
        for i in range(e - s):
            x = c1 * w1[i] + c2 * w2[i] + c3 * w3[i] + c4 * w4[i]
            if not first:
                x += a[i]
            o[i] = x
            z += x * zero
        return z != z

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=_FM)
    def _k_add2(acc, w1, c1, w2, c2, out, s, e, first):  # pragma: no cover
        a = acc[s:e]
        o = out[s:e]
        zero = c1 - c1
        z = zero
        for i in range(e - s):
            x = c1 * w1[i] + c2 * w2[i]
            if not first:
                x += a[i]
            o[i] = x
            z += x * zero
        return z != z

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; keep a numpy path anyway
    HAVE_NUMBA = False

_FAST = (np.dtype(np.float32), np.dtype(np.float64))
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
                _k_add(acc, src, sc, acc, 0, 4)
                _k_first(src, sc, acc, 0, 4)
                _k_scan(src, sc, 0, 4)
                for first in (True, False):
                    _k_add4(acc, src, sc, src, sc, src, sc, src, sc, acc, 0, 4, first)
                    _k_add2(acc, src, sc, src, sc, acc, 0, 4, first)


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def _executor(k: int) -> ThreadPoolExecutor:
    """Shared worker threads (numpy releases the GIL in ufuncs, so chunks fold in parallel)."""
    ex = _EXECUTORS.get(k)
    if ex is None:
        ex = _EXECUTORS[k] = ThreadPoolExecutor(max_workers=k, thread_name_prefix="fedavg-fold")
    return ex


def _numpy_alloc(nbytes: int) -> memoryview:
    return memoryview(np.empty(nbytes, dtype=np.uint8)).cast("B")


def _finite(t: np.ndarray) -> bool:
    s = np.dot(t, t) if t.dtype.kind == "f" and t.dtype.itemsize >= 4 else np.float64(0)
    if np.isfinite(s) and t.dtype.itemsize >= 4:
        return True
    return bool(np.isfinite(t).all())


def partial_reserve(layout: Layout, acc_dtype: np.dtype) -> int:
    """Bytes to reserve in front of an accumulator so a partial header can be written there."""
    big = Header("partial", 2**62, layout, round=2**62, client="x" * 256, acc=np.dtype(acc_dtype))
    return data_offset_for(len(header_bytes(big)))


@dataclass
class FoldStats:
    folded: int = 0
    rejected: int = 0
    bytes_read: int = 0


class Accumulator:
    """Σnᵢwᵢ (flat, ``acc_dtype``) and Σnᵢ for one model structure; reusable across rounds.

    ``alloc`` supplies the model-sized buffers (a slot allocator makes the partial a slot that
    can be handed upward without a copy). Each buffer reserves room for a partial header."""

    def __init__(
        self,
        layout: Layout,
        *,
        acc_dtype: Any = np.float32,
        check: Literal["swap", "precheck"] = "swap",
        chunk: int = DEFAULT_CHUNK,
        alloc: Alloc | None = None,
        threads: int = 1,
        kernels: bool = True,
    ):
        if check not in ("swap", "precheck"):
            raise ValueError(f"check: expected 'swap' or 'precheck', got {check!r}")
        self.acc_dtype = np.dtype(acc_dtype)
        if self.acc_dtype not in (np.float32, np.float64):
            raise ValueError(f"acc_dtype: expected float32 or float64, got {self.acc_dtype}")
        self.layout = layout
        self.total = layout.total
        self.check = check
        self.chunk = int(chunk)
        self.reserve = partial_reserve(layout, self.acc_dtype)
        alloc = alloc or _numpy_alloc
        nbuf = 2 if check == "swap" else 1
        self.buffers: list[memoryview] = []
        self._acc: list[np.ndarray] = []
        for _ in range(nbuf):
            raw = alloc(self.reserve + self.total * self.acc_dtype.itemsize)
            mv = (
                memoryview(raw).cast("B")
                if not isinstance(raw, memoryview) or raw.format != "B"
                else raw
            )
            self.buffers.append(mv)
            self._acc.append(
                np.frombuffer(mv, dtype=self.acc_dtype, count=self.total, offset=self.reserve)
            )
        self.threads = max(1, int(threads))
        self.kernels = kernels and HAVE_NUMBA  # numba fused kernels for float32/float64 inputs
        self._tmps = [
            np.empty(min(self.chunk, max(self.total, 1)), dtype=self.acc_dtype)
            for _ in range(self.threads)
        ]
        self._tmp = self._tmps[0]
        self._live = 0
        self.count = 0  # inputs folded this round
        self.n = 0  # Σn
        self.stats = FoldStats()
        self.trace: list[np.ndarray] | None = None  # set to [] to record the arrays folds read
        # the published model sits in the (single) accumulator buffer until the broadcast that
        # reads it is over: no fold may write there before :meth:`release_model`
        self.model_held = False

    # -- state -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Memory held (accumulators + scratch)."""
        return sum(len(b) for b in self.buffers) + sum(t.nbytes for t in self._tmps)

    @property
    def value(self) -> np.ndarray:
        """The live flat accumulator Σnᵢwᵢ (meaningless while ``count == 0``)."""
        return self._acc[self._live]

    def reset(self) -> None:
        """Start a new round; buffers are kept (warm reuse), nothing is zeroed: the first fold
        writes ``n·w`` instead of adding it."""
        self.count = 0
        self.n = 0

    def _layer_at(self, elem: int) -> str:
        i = bisect.bisect_right(self.layout.elem_offsets, elem) - 1
        return self.layout.layers[max(i, 0)].name

    # -- folding -----------------------------------------------------------------------------
    def fold(self, payload: Payload | Any, client: str | None = None) -> None:
        """Fold a packed update (``update`` or ``partial``), given parsed or as a raw buffer."""
        try:
            p = payload if isinstance(payload, Payload) else parse(payload)
        except PackError as e:
            raise UpdateRejected(str(e), client) from None
        h = p.header
        client = client if client is not None else h.client
        why = self.layout.mismatch(h.layout)
        if why:
            raise UpdateRejected(f"shape mismatch: {why}", client)
        if h.kind == "partial":
            self.fold_flat(p.flat(), h.n, client=client)
        elif h.kind == "update":
            self.fold_runs(p.data, h.layout, h.n, client=client)
        else:
            raise UpdateRejected(f"cannot fold a {h.kind!r} payload", client)

    def fold_model(self, model: Any, n: int, client: str | None = None) -> None:
        """Fold unpacked arrays (flat array, list or named layers): views, no copies."""
        from hearth.functions.fedavg.pack import named_layers

        layers = named_layers(model)
        lay = Layout.of(layers)
        why = self.layout.mismatch(lay)
        if why:
            raise UpdateRejected(f"shape mismatch: {why}", client)
        segs = []
        for (_, arr), eo in zip(layers, self.layout.elem_offsets, strict=True):
            if arr.size:
                segs.append((np.ravel(arr), eo))  # ravel is a view for contiguous arrays
        self._fold_segments(segs, n, client, weighted=True)

    def fold_runs(
        self, data: memoryview, layout: Layout, n: int, client: str | None = None
    ) -> None:
        """Fold an update's data region (layers packed per ``layout``) weighted by ``n``."""
        segs = [
            (np.frombuffer(data, dtype=r.dtype, count=r.count, offset=r.byte_offset), r.elem_offset)
            for r in layout.runs
        ]
        self._fold_segments(segs, n, client, weighted=True)

    def fold_batch(
        self, items: list[tuple[Payload, int, str | None]], validated: bool = False
    ) -> list[Exception | None]:
        """Fold several queued updates (parsed payloads with n and client), reading and writing
        the accumulator once per group of 4 (or 2) instead of once per update.

        Same guarantees as :meth:`fold`: a group is written into the spare accumulator and only
        swapped in if every value is finite; a non-finite group is refolded one update at a time
        so exactly the bad update is rejected. ``validated=True`` says every ``n·w`` was already
        checked finite (:class:`StreamScan`, while the bytes arrived): with ``check="precheck"``
        the groups then fold in place into the one accumulator, with no extra read pass.
        Returns one error (or None) per item."""
        entries = []
        for p, n, client in items:
            h = p.header
            segs = None
            if (
                h.kind == "update"
                and h.layout == self.layout
                and self._groupable(h.layout, n, validated)
            ):
                segs = [
                    (
                        np.frombuffer(p.data, dtype=r.dtype, count=r.count, offset=r.byte_offset),
                        r.elem_offset,
                    )
                    for r in h.layout.runs
                ]
            entries.append((segs, n, lambda p=p, client=client: self.fold(p, client)))
        return self._fold_many(entries)

    def fold_models_batch(self, items: list[tuple[Any, int, str | None]]) -> list[Exception | None]:
        """:meth:`fold_batch` for arrays already in memory (e.g. Flower's tensors): views only."""
        from hearth.functions.fedavg.pack import named_layers

        entries = []
        for model, n, client in items:
            segs = None
            try:
                layers = named_layers(model)
                lay = Layout.of(layers)
            except PackError:
                lay = None
            if lay is not None and lay == self.layout and self._groupable(lay, n):
                segs = [
                    (np.ravel(a), eo)
                    for (_, a), eo in zip(layers, lay.elem_offsets, strict=True)
                    if a.size
                ]
                if not all(a.flags.c_contiguous for a, _ in segs):
                    segs = None
            entries.append((segs, n, lambda m=model, n=n, c=client: self.fold_model(m, n, c)))
        return self._fold_many(entries)

    def _groupable(self, layout: Layout, n: Any, validated: bool = False) -> bool:
        return (
            self.kernels
            and (self.check == "swap" or validated)
            and all(r.dtype in _FAST for r in layout.runs)
            and isinstance(n, int | np.integer)
            and not isinstance(n, bool)
            and n > 0
        )

    def _fold_many(self, entries: list) -> list[Exception | None]:
        errs: list[Exception | None] = [None] * len(entries)
        fast: list[int] = []
        for i, (segs, _n, one) in enumerate(entries):
            if segs is not None:
                fast.append(i)
                continue
            try:
                one()  # the one-by-one path raises the precise error
            except UpdateRejected as e:
                errs[i] = e
        while fast:
            k = 4 if len(fast) >= 4 else 2 if len(fast) >= 2 else 1
            group, fast = fast[:k], fast[k:]
            if k == 1 or not self._fold_group([(entries[i][0], entries[i][1]) for i in group]):
                for i in group:  # one at a time: pinpoints the bad update, folds the others
                    try:
                        entries[i][2]()
                    except UpdateRejected as e:
                        errs[i] = e
        return errs

    def _fold_group(self, group: list[tuple[list[tuple[np.ndarray, int]], int]]) -> bool:
        self._writable()
        first = self.count == 0
        in_place = first or self.check != "swap"  # precheck: inputs were validated as they arrived
        acc = self._acc[self._live]
        out = acc if in_place else self._acc[1 - self._live]
        srcs = [segs for segs, _ in group]
        if self.trace is not None:
            for segs in srcs:
                self.trace.extend(src for src, _ in segs)
        scales = [self.acc_dtype.type(n) for _, n in group]
        ch = max(self.chunk, KERNEL_CHUNK) if self.chunk == DEFAULT_CHUNK else self.chunk
        tasks = [
            (ri, s, min(srcs[0][ri][0].shape[0], s + ch))
            for ri in range(len(srcs[0]))
            for s in range(0, srcs[0][ri][0].shape[0], ch)
        ]

        def run(part: list[tuple[int, int, int]]) -> bool:
            """Fold chunks with the fused kernels (nogil: threads run in parallel)."""
            for ri, s, e in part:
                eo = srcs[0][ri][1]
                ws = [segs[ri][0][s:e] for segs in srcs]
                if len(ws) == 4:
                    bad = _k_add4(
                        acc,
                        ws[0],
                        scales[0],
                        ws[1],
                        scales[1],
                        ws[2],
                        scales[2],
                        ws[3],
                        scales[3],
                        out,
                        eo + s,
                        eo + e,
                        first,
                    )
                else:
                    bad = _k_add2(
                        acc, ws[0], scales[0], ws[1], scales[1], out, eo + s, eo + e, first
                    )
                if bad:
                    return True
            return False

        if self.threads > 1 and len(tasks) > 1:
            k = self.threads
            parts = [tasks[i * len(tasks) // k : (i + 1) * len(tasks) // k] for i in range(k)]
            bad = any([f.result() for f in [_executor(k).submit(run, p) for p in parts]])
        else:
            bad = run(tasks)
        if bad:
            if not in_place or first:
                return False  # the live accumulator is untouched (spare, or still empty)
            # validated inputs: only the sum itself overflowed (as in _work)
            raise FloatingPointError("accumulator overflow: use acc_dtype=float64")
        if not in_place:
            self._live = 1 - self._live
        self.count += len(group)
        self.n += sum(int(n) for _, n in group)
        self.stats.folded += len(group)
        self.stats.bytes_read += sum(a.nbytes for segs in srcs for a, _ in segs)
        return True

    def fold_flat(self, flat: np.ndarray, n: int, client: str | None = None) -> None:
        """Fold a partial sum (flat Σnw of the same structure), unweighted; adds ``n`` to Σn."""
        if flat.shape != (self.total,):
            raise UpdateRejected(
                f"shape mismatch: partial has {flat.size} elements, expected {self.total}", client
            )
        self._fold_segments([(flat, 0)] if self.total else [], n, client, weighted=False)

    def _fold_segments(
        self, segs: list[tuple[np.ndarray, int]], n: int, client: str | None, weighted: bool
    ) -> None:
        if (
            isinstance(n, bool)
            or not isinstance(n, int | np.integer)
            or n < 0
            or (weighted and n == 0)
        ):
            raise UpdateRejected(f"sample count must be a positive integer, got {n!r}", client)
        scale = self.acc_dtype.type(n)
        self._writable()
        if self.trace is not None:
            self.trace.extend(src for src, _ in segs)
        first = self.count == 0
        acc = self._acc[self._live]
        if self.check == "swap" and not first:
            out = self._acc[1 - self._live]
        else:
            out = acc
        if self.check == "precheck" and not first:
            for (
                src,
                eo,
            ) in segs:  # validation pass: the live accumulator is untouched until it passes
                self._scan(src, eo, scale, weighted, client)
        fast = self.kernels and all(src.dtype in _FAST for src, _ in segs)
        ch = max(self.chunk, KERNEL_CHUNK) if fast and self.chunk == DEFAULT_CHUNK else self.chunk
        tasks = []
        nbytes = 0
        for src, eo in segs:
            m = src.shape[0]
            nbytes += src.nbytes
            tasks.extend((src, eo, s, min(m, s + ch)) for s in range(0, m, ch))
        check_now = self.check == "swap" or first
        if self.threads > 1 and len(tasks) > 1:
            k = self.threads
            groups = [tasks[i * len(tasks) // k : (i + 1) * len(tasks) // k] for i in range(k)]
            pool = _executor(k)
            futs = [
                pool.submit(
                    self._work, g, self._tmps[i], weighted, scale, first, check_now, acc, out
                )
                for i, g in enumerate(groups)
            ]
            bads = [f.result() for f in futs]
            bad = next((b for b in bads if b is not None), None)
        else:
            bad = self._work(tasks, self._tmps[0], weighted, scale, first, check_now, acc, out)
        if bad is not None:
            self._reject(bad[0], bad[1], client)
        if self.check == "swap" and not first:
            self._live = 1 - self._live
        self.count += 1
        self.n += int(n)
        self.stats.folded += 1
        self.stats.bytes_read += nbytes

    def _work(self, tasks, tmp, weighted, scale, first, check_now, acc, out):
        """Fold chunks; returns (first element, chunk) of a non-finite chunk, else None."""
        if self.kernels:
            fast = [t for t in tasks if t[0].dtype in _FAST]
            if len(fast) == len(tasks):
                sc = scale if weighted else self.acc_dtype.type(1)
                for src, eo, s, e in tasks:
                    piece = src[s:e]
                    if first:
                        bad = _k_first(piece, sc, out, eo + s, eo + e)
                    else:
                        bad = _k_add(acc, piece, sc, out, eo + s, eo + e)
                    if bad and check_now:
                        return eo + s, out[eo + s : eo + e]
                    if bad:  # precheck passed, so only the sum itself overflowed float32
                        raise FloatingPointError("accumulator overflow: use acc_dtype=float64")
                return None
        for src, eo, s, e in tasks:
            dst = out[eo + s : eo + e]
            if first:
                # first input: write n·w (or the partial) straight into the accumulator
                if weighted:
                    np.multiply(src[s:e], scale, out=dst)
                else:
                    np.copyto(dst, src[s:e], casting="same_kind")
                if not _finite(dst):
                    return eo + s, dst
                continue
            if weighted:
                t = tmp[: e - s]
                np.multiply(src[s:e], scale, out=t)
            else:
                t = src[s:e]
            if check_now and not _finite(t):
                return eo + s, t
            np.add(acc[eo + s : eo + e], t, out=dst)
        return None

    def _scan(
        self, src: np.ndarray, eo: int, scale: Any, weighted: bool, client: str | None
    ) -> None:
        if self.kernels and src.dtype in _FAST and src.shape[0]:
            sc = scale if weighted else self.acc_dtype.type(1)
            if not _k_scan(src, sc, 0, src.shape[0]):
                return  # one fused read pass; the numpy loop below only runs to locate a bad value
        ch = self.chunk
        for s in range(0, src.shape[0], ch):
            e = min(src.shape[0], s + ch)
            t = self._tmp[: e - s]
            if weighted:
                np.multiply(src[s:e], scale, out=t)
            else:
                np.copyto(t, src[s:e], casting="same_kind")
            if not _finite(t):
                self._reject(eo + s, t, client)

    def _reject(self, elem0: int, chunk: np.ndarray, client: str | None) -> None:
        bad = int(np.flatnonzero(~np.isfinite(chunk))[0]) + elem0
        name = self._layer_at(bad)
        li = self.layout.names.index(name)
        self.stats.rejected += 1
        # the live accumulator is intact (swap/precheck); a first input leaves count == 0
        raise UpdateRejected(
            f"non-finite value (NaN/Inf after weighting) in layer {name!r} at element {bad - self.layout.elem_offsets[li]}",
            client,
        )

    def _writable(self) -> None:
        if self.model_held:
            raise RuntimeError(
                "the accumulator still holds the published model (broadcast not released)"
            )

    # -- output ------------------------------------------------------------------------------
    def can_finalize_in_place(self) -> bool:
        """True when the model has the accumulator's exact byte layout (every layer of the
        accumulator's dtype), so dividing in place turns the accumulator into the model."""
        olay = self.layout.output()
        isz = self.acc_dtype.itemsize
        return all(ly.dtype == self.acc_dtype for ly in olay.layers) and all(
            bo == eo * isz for bo, eo in zip(olay.byte_offsets, olay.elem_offsets, strict=True)
        )

    def finalize_in_place(self, round: int | None = None) -> memoryview:
        """Divide by Σn in place and write a ``model`` header in front: the live accumulator
        becomes the packed model payload (no second model-sized buffer). Folds are refused
        (:attr:`model_held`) until :meth:`release_model`; the next fold then starts a new sum."""
        if self.count == 0 or self.n == 0:
            raise ValueError("nothing folded: no model to finalize")
        if not self.can_finalize_in_place():
            raise ValueError("the model's layout differs from the accumulator's: finalize(out=)")
        acc = self.value
        n = self.acc_dtype.type(self.n)
        if self.threads > 1 and acc.size >= 2 * self.chunk:
            k = self.threads  # numpy releases the GIL: the halves divide in parallel
            cuts = [i * acc.size // k for i in range(k + 1)]
            parts = [acc[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
            ex = _executor(k)
            for f in [ex.submit(np.divide, p, n, out=p) for p in parts]:
                f.result()
        else:
            np.divide(acc, n, out=acc)
        buf = self.buffers[self._live]
        write_header(buf, Header("model", self.n, self.layout.output(), round=round), self.reserve)
        self.model_held = True
        return buf[: self.reserve + self.total * self.acc_dtype.itemsize]

    def release_model(self) -> None:
        """The broadcast of the model held in place is over: the buffer may be written again."""
        self.model_held = False
        self.count = 0
        self.n = 0

    def partial(self, round: int | None = None) -> memoryview:
        """The live accumulator as a packed ``partial`` payload, in place (no copy of the data):
        the header is written into the reserved bytes in front of it."""
        if self.count == 0:
            raise ValueError("nothing folded yet: no partial to emit")
        buf = self.buffers[self._live]
        h = Header("partial", self.n, self.layout, round=round, acc=self.acc_dtype)
        write_header(buf, h, data_off=self.reserve)
        return buf[: self.reserve + self.total * self.acc_dtype.itemsize]

    def finalize(self, out: Any | None = None) -> list[tuple[str, np.ndarray]]:
        """Divide by Σn into the output structure (float layers keep their dtype).

        ``out`` is an optional data region laid out as ``layout.output()`` (e.g. a model payload
        in a slot); otherwise fresh arrays are allocated."""
        if self.count == 0 or self.n == 0:
            raise ValueError("nothing folded: no model to finalize")
        olay = self.layout.output()
        acc = self.value
        res = []
        denom = self.acc_dtype.type(self.n)
        for ly, bo, eo in zip(olay.layers, olay.byte_offsets, olay.elem_offsets, strict=True):
            if out is not None:
                dst = np.frombuffer(out, dtype=ly.dtype, count=ly.size, offset=bo)
            else:
                dst = np.empty(ly.size, dtype=ly.dtype)
            if ly.size:
                np.divide(acc[eo : eo + ly.size], denom, out=dst, casting="same_kind")
            res.append((ly.name, dst.reshape(ly.shape)))
        return res


class StreamScan:
    """Checks ``n·w`` of an update for NaN/Inf while its bytes arrive, one received range at a
    time (the range is still in cache), so the fold needs no validation pass of its own.

    ``feed(data, upto)`` scans the elements whose bytes lie in ``[done, upto)`` of the update's
    data region; it returns the element index of a bad value's chunk, or None. ``usable`` is
    False for layouts the fused kernel does not cover (the fold then validates as usual)."""

    def __init__(self, layout: Layout, n: int, acc_dtype: Any = np.float32):
        self.runs = layout.runs
        self.scale = np.dtype(acc_dtype).type(n)
        self.usable = HAVE_NUMBA and all(r.dtype in _FAST for r in self.runs)
        self.done = 0  # bytes of the data region already scanned
        self.bad: int | None = None

    def feed(self, data: memoryview, upto: int) -> int | None:
        if not self.usable or self.bad is not None:
            return self.bad
        for r in self.runs:
            isz = r.dtype.itemsize
            lo, hi = r.byte_offset, r.byte_offset + r.count * isz
            s_b, e_b = max(lo, self.done), min(hi, upto)
            s, e = -(-(s_b - lo) // isz), (e_b - lo) // isz
            if e <= s:
                continue
            src = np.frombuffer(data, dtype=r.dtype, count=r.count, offset=lo)
            if _k_scan(src, self.scale, s, e):
                self.bad = r.elem_offset + s
                return self.bad
        # a value straddling `upto` is scanned with the next range
        self.done = max(self.done, self._complete(upto))
        return None

    def _complete(self, upto: int) -> int:
        for r in self.runs:
            isz = r.dtype.itemsize
            lo, hi = r.byte_offset, r.byte_offset + r.count * isz
            if lo <= upto < hi:
                return lo + (upto - lo) // isz * isz
        return upto

    @property
    def complete(self) -> bool:
        return self.usable and self.bad is None
