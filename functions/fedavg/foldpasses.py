"""Chunked passes over flat arrays: the loops an :class:`~hearth.functions.fedavg.fold.Accumulator`
runs, with no state of their own.

Why chunks: ``n·w`` for a 233 MB layer would be a 233 MB temporary; the numpy path scales one
chunk (1 MiB by default, it stays in cache) into a reused scratch array and adds it, so the only
model-sized buffers an aggregator owns are its accumulators. The fused kernels need no scratch;
their chunks only bound the call overhead and split a pass over threads.

A task is ``(src, elem_offset, s, e)``: elements ``[s, e)`` of ``src`` go to elements
``[elem_offset + s, elem_offset + e)`` of the accumulator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hearth.functions.fedavg.foldkernels import (
    FAST,
    executor,
    finite,
    k_add,
    k_add2,
    k_add2_ip,
    k_add3,
    k_add3_ip,
    k_add4,
    k_add4_ip,
    k_add_ip,
    k_first,
    k_scan,
)

Task = tuple[np.ndarray, int, int, int]  # (src, elem offset in the accumulator, start, end)
Bad = tuple[int, np.ndarray]  # (accumulator element of a non-finite chunk's start, the chunk)


def tasks_of(segs: Sequence[tuple[np.ndarray, int]], chunk: int) -> list[Task]:
    """Cut ``(src, elem_offset)`` segments into chunk tasks."""
    out: list[Task] = []
    for src, eo in segs:
        m = src.shape[0]
        out.extend((src, eo, s, min(m, s + chunk)) for s in range(0, m, chunk))
    return out


def split(
    run: Callable[[list, int], Any], tasks: list, threads: int, interleave: bool = False
) -> list[Any]:
    """``run(part, i)`` on ``threads`` parts of ``tasks`` at once (one part inline when
    ``threads`` is 1 or there is a single task); returns the parts' results in order. Parts
    are contiguous, or with ``interleave`` part i takes tasks i, i + threads, ... (so the
    finished tasks form a prefix that grows steadily: :class:`Frontier`)."""
    if threads <= 1 or len(tasks) <= 1:
        return [run(tasks, 0)]
    k = threads
    if interleave:
        parts = [tasks[i::k] for i in range(k)]
    else:
        parts = [tasks[i * len(tasks) // k : (i + 1) * len(tasks) // k] for i in range(k)]
    pool = executor(k)
    return [f.result() for f in [pool.submit(run, p, i) for i, p in enumerate(parts)]]


class Frontier:
    """How far a grouped pass has read its inputs, for a pass whose ``k`` workers take tasks
    ``i, i + k, ...`` (:func:`split` with ``interleave``): every task before the first
    unfinished one is done. Each time that prefix moved ``every`` elements, ``report`` gets
    every input's address below which the pass will not read it again (a task is
    ``(run index, start, end)`` of :func:`fold_group_chunks`)."""

    def __init__(
        self,
        tasks: list[tuple[int, int, int]],
        srcs: list[list[tuple[np.ndarray, int]]],
        k: int,
        report: Callable[[list[int]], None],
        every: int,
    ):
        self.tasks, self.srcs, self.report, self.every = tasks, srcs, report, every
        self.k = k if k > 1 and len(tasks) > 1 else 1
        self.count = [0] * self.k  # tasks finished by each worker
        self.elem = 0  # the frontier last reported (accumulator elements)
        self.lock = threading.Lock()

    @staticmethod
    def address(a: np.ndarray, i: int = 0) -> int:
        return int(a.__array_interface__["data"][0]) + i * a.itemsize

    def starts(self) -> list[int]:
        return [self.address(segs[0][0]) for segs in self.srcs]

    def ends(self) -> list[int]:
        return [self.address(segs[-1][0], segs[-1][0].shape[0]) for segs in self.srcs]

    def done(self, w: int) -> None:
        """Worker ``w`` finished its next task."""
        self.count[w] += 1
        with self.lock:
            n = min(i + c * self.k for i, c in enumerate(self.count))  # first unfinished task
            if n >= len(self.tasks):
                return  # the end is reported by the pass itself
            ri, s, _e = self.tasks[n]
            elem = self.srcs[0][ri][1] + s
            if elem - self.elem < self.every:
                return
            self.elem = elem
            self.report([self.address(segs[ri][0], s) for segs in self.srcs])


def fold_chunks(
    tasks: list[Task],
    tmp: np.ndarray,
    *,
    scale: Any,
    first: bool,
    check: bool,
    acc: np.ndarray,
    out: np.ndarray,
    kernels: bool,
) -> Bad | None:
    """``out = acc + scale·src`` (``first``: ``out = scale·src``) chunk by chunk; ``scale`` None:
    unweighted (a partial). Returns the first non-finite chunk when ``check`` (the caller
    rejects the input), else None. A non-finite sum of inputs that were checked beforehand
    (``check`` False) is an accumulator overflow."""
    if kernels and all(t[0].dtype in FAST for t in tasks):
        sc = out.dtype.type(1) if scale is None else scale
        for src, eo, s, e in tasks:
            piece = src[s:e]
            if first:
                bad = k_first(piece, sc, out, eo + s, eo + e)
            elif in_place(acc, out):
                bad = k_add_ip(out, piece, sc, eo + s, eo + e)
            else:
                bad = k_add(acc, piece, sc, out, eo + s, eo + e)
            if bad and check:
                return eo + s, out[eo + s : eo + e]
            if bad:  # precheck passed, so only the sum itself overflowed float32
                raise FloatingPointError("accumulator overflow: use acc_dtype=float64")
        return None
    unit = scale is None
    for src, eo, s, e in tasks:
        dst = out[eo + s : eo + e]
        if first:
            # first input: write n·w (or the partial) straight into the accumulator
            if unit:
                np.copyto(dst, src[s:e], casting="same_kind")
            else:
                np.multiply(src[s:e], scale, out=dst)
            if not finite(dst):
                return eo + s, dst
            continue
        if unit:
            t = src[s:e]
        else:
            t = tmp[: e - s]
            np.multiply(src[s:e], scale, out=t)
        if check and not finite(t):
            return eo + s, t
        np.add(acc[eo + s : eo + e], t, out=dst)
    return None


GROUP_KERNELS = {2: k_add2, 3: k_add3, 4: k_add4}
GROUP_KERNELS_IP = {2: k_add2_ip, 3: k_add3_ip, 4: k_add4_ip}


def in_place(acc: np.ndarray, out: np.ndarray) -> bool:
    """``out`` is ``acc`` (the in-place kernels vectorise there; the two-array ones do not)."""
    return acc is out or (
        acc.__array_interface__["data"][0] == out.__array_interface__["data"][0]
        and acc.shape == out.shape
    )


def fold_group_chunks(
    tasks: list[tuple[int, int, int]],
    srcs: list[list[tuple[np.ndarray, int]]],
    scales: list[Any],
    *,
    acc: np.ndarray,
    out: np.ndarray,
    first: bool,
    d: Any = None,
    done: Callable[[], None] | None = None,
) -> bool:
    """``out = (acc + Σ scaleᵢ·srcᵢ) / d`` (``first``: without ``acc``; ``d`` None: no division,
    groups of 2 or more only) for a group of 1 to 4 inputs of one layout, with the fused
    kernels; a task is ``(run index, start, end)``; ``done()`` after each. Returns True if a
    value was not finite (the caller decides what that means: a bad input, or an overflow)."""
    if d is not None and len(srcs) < 2:
        raise ValueError("a pass divides only with 2 or more inputs")
    d = out.dtype.type(1) if d is None else d
    ip = in_place(acc, out)
    for ri, s, e in tasks:
        eo = srcs[0][ri][1]
        ws = [segs[ri][0][s:e] for segs in srcs]
        if len(ws) >= 2:  # one fused kernel per group size: (weights, scale) pairs in order
            pairs = [x for w, c in zip(ws, scales, strict=False) for x in (w, c)]
            if ip:
                bad = GROUP_KERNELS_IP[len(ws)](*pairs, out, eo + s, eo + e, first, d)
            else:
                bad = GROUP_KERNELS[len(ws)](acc, *pairs, out, eo + s, eo + e, first, d)
        elif first:
            bad = k_first(ws[0], scales[0], out, eo + s, eo + e)
        elif ip:
            bad = k_add_ip(out, ws[0], scales[0], eo + s, eo + e)
        else:
            bad = k_add(acc, ws[0], scales[0], out, eo + s, eo + e)
        if bad:
            return True
        if done is not None:
            done()
    return False


def find_bad(src: np.ndarray, scale: Any, tmp: np.ndarray, chunk: int, kernels: bool) -> Bad | None:
    """The first chunk of ``scale·src`` (``scale`` None: ``src``) holding a NaN/Inf (element
    offset within ``src``, the scaled chunk), or None: one fused read pass; the numpy loop only
    runs to locate a bad value (or for dtypes the kernels do not take)."""
    if kernels and src.dtype in FAST and src.shape[0]:
        sc = tmp.dtype.type(1) if scale is None else scale
        if not k_scan(src, sc, 0, src.shape[0]):
            return None
    for s in range(0, src.shape[0], chunk):
        e = min(src.shape[0], s + chunk)
        t = tmp[: e - s]
        if scale is None:
            np.copyto(t, src[s:e], casting="same_kind")
        else:
            np.multiply(src[s:e], scale, out=t)
        if not finite(t):
            return s, t
    return None


def divide_in_place(acc: np.ndarray, n: Any, threads: int, chunk: int) -> None:
    """``acc /= n``, split over ``threads`` for a large accumulator (numpy releases the GIL)."""
    if threads > 1 and acc.size >= 2 * chunk:
        cuts = [i * acc.size // threads for i in range(threads + 1)]
        parts = [acc[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        ex = executor(threads)
        for f in [ex.submit(np.divide, p, n, out=p) for p in parts]:
            f.result()
    else:
        np.divide(acc, n, out=acc)
