"""Eager folding: ``acc += n·w`` as each update arrives, reading the update in place.

This module holds the :class:`Accumulator` (its buffers, the round's count and Σn, what a bad
input does to it); its passes over several queued updates at once are in ``foldgroups``, what
it hands on (a partial, the model in place) in ``foldoutput``, the loops it runs in
``foldpasses``, the compiled kernels in ``foldkernels``, the check of an update while it arrives
in ``streamscan``, and the names they share (the error, the counters) in ``foldtypes``.

Why two accumulators (``check="swap"``, the default): a NaN/Inf can sit in the last chunk of an
update, after the first chunks were already added. Instead of a second pass over the update we
write ``acc' = acc + n·w`` into the spare accumulator and swap on success; a bad chunk abandons
the spare and the live accumulator was never touched. Same memory traffic as in place, one extra
model of memory. ``check="precheck"`` keeps one accumulator and validates the update first (one
more read pass).

Only the top divides: an accumulator emits the unnormalised pair (Σnᵢwᵢ, Σnᵢ).
"""

from __future__ import annotations

import bisect
from typing import Any, Literal

import numpy as np
from hearth.functions.fedavg import foldpasses as passes
from hearth.functions.fedavg.foldgroups import GroupFolds
from hearth.functions.fedavg.foldkernels import (
    FAST,
    HAVE_NUMBA,
    KERNEL_CHUNK,
    warm_kernels,
)
from hearth.functions.fedavg.foldoutput import AccumulatorOutput
from hearth.functions.fedavg.foldtypes import (
    DEFAULT_CHUNK,
    Alloc,
    FoldStats,
    ReadWatch,
    UpdateRejected,
)
from hearth.functions.fedavg.pack import (
    Header,
    Layout,
    PackError,
    Payload,
    data_offset_for,
    header_bytes,
    parse,
)
from hearth.functions.fedavg.streamscan import StreamScan

__all__ = [
    "DEFAULT_CHUNK",
    "HAVE_NUMBA",
    "KERNEL_CHUNK",
    "Accumulator",
    "Alloc",
    "FoldStats",
    "ReadWatch",
    "StreamScan",
    "UpdateRejected",
    "partial_reserve",
    "warm_kernels",
]


def _numpy_alloc(nbytes: int) -> memoryview:
    return memoryview(np.empty(nbytes, dtype=np.uint8)).cast("B")


def partial_reserve(layout: Layout, acc_dtype: np.dtype) -> int:
    """Bytes to reserve in front of an accumulator so a partial header can be written there."""
    big = Header("partial", 2**62, layout, round=2**62, client="x" * 256, acc=np.dtype(acc_dtype))
    return data_offset_for(len(header_bytes(big)))


class Accumulator(AccumulatorOutput, GroupFolds):
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
        # the last pass divided by Σn (``fold_batch(last=True)``): the live buffer is the model
        self.divided = False
        # told how far each pass that will never read its inputs again has read them (their
        # memory can be reused behind it: the round endpoint lends the slots to the next
        # updates); such a pass folds inputs known finite in place, and a value that is not
        # finite there is an overflow, not a bad input to refold without
        self.reader: ReadWatch | None = None

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
        self.divided = False

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
        scale = self.acc_dtype.type(n) if weighted else None
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
            # validation pass: the live accumulator is untouched until it passes
            for src, eo in segs:
                bad = passes.find_bad(src, scale, self._tmp, self.chunk, self.kernels)
                if bad is not None:
                    self._reject(eo + bad[0], bad[1], client)
        fast = self.kernels and all(src.dtype in FAST for src, _ in segs)
        ch = max(self.chunk, KERNEL_CHUNK) if fast and self.chunk == DEFAULT_CHUNK else self.chunk
        tasks = passes.tasks_of(segs, ch)
        check = self.check == "swap" or first

        def run(part: list[passes.Task], i: int) -> passes.Bad | None:
            return passes.fold_chunks(
                part,
                self._tmps[i],
                scale=scale,
                first=first,
                check=check,
                acc=acc,
                out=out,
                kernels=self.kernels,
            )

        bad = next((b for b in passes.split(run, tasks, self.threads) if b is not None), None)
        if bad is not None:
            self._reject(bad[0], bad[1], client)
        if self.check == "swap" and not first:
            self._live = 1 - self._live
        self.count += 1
        self.n += int(n)
        self.stats.folded += 1
        self.stats.bytes_read += sum(src.nbytes for src, _ in segs)

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
        if self.divided:
            raise RuntimeError("the last pass divided the sum: finalize_in_place() it first")
