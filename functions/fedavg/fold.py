"""Eager folding: ``acc += n·w`` as each update arrives, reading the update in place.

This module holds the :class:`Accumulator` (its buffers, the round's count and Σn, what a bad
input does to it); what it hands on (a partial, the model in place) is in ``foldoutput``, the
loops it runs in ``foldpasses``, the compiled kernels in ``foldkernels``, and the check of an
update while it arrives in ``streamscan``.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from hearth.functions.fedavg import foldpasses as passes
from hearth.functions.fedavg.foldkernels import (
    FAST,
    HAVE_NUMBA,
    KERNEL_CHUNK,
    warm_kernels,
)
from hearth.functions.fedavg.foldoutput import AccumulatorOutput
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

DEFAULT_CHUNK = 1 << 18  # elements per numpy chunk (1 MiB of float32: scratch stays in cache)
Alloc = Callable[[int], Any]  # nbytes -> writable buffer (bytearray, memoryview of a slot, ...)
# (each input's first data address, the addresses below which the pass is done with it, final)
ReadWatch = Callable[[list[int], list[int], bool], None]
READ_REPORT = 1 << 20  # elements a pass reads between two reports to its ReadWatch


class UpdateRejected(ValueError):
    """An update (or partial) cannot be folded; the accumulator is unchanged."""

    def __init__(self, message: str, client: str | None = None):
        super().__init__(message if client is None else f"update from {client!r}: {message}")
        self.client = client


def _numpy_alloc(nbytes: int) -> memoryview:
    return memoryview(np.empty(nbytes, dtype=np.uint8)).cast("B")


def partial_reserve(layout: Layout, acc_dtype: np.dtype) -> int:
    """Bytes to reserve in front of an accumulator so a partial header can be written there."""
    big = Header("partial", 2**62, layout, round=2**62, client="x" * 256, acc=np.dtype(acc_dtype))
    return data_offset_for(len(header_bytes(big)))


@dataclass
class FoldStats:
    folded: int = 0
    rejected: int = 0
    bytes_read: int = 0


class Accumulator(AccumulatorOutput):
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

    def fold_batch(
        self,
        items: list[tuple[Payload, int, str | None]],
        validated: bool | list[bool] = False,
        last: bool = False,
    ) -> list[Exception | None]:
        """Fold several queued updates (parsed payloads with n and client), reading and writing
        the accumulator once per group of up to 4 instead of once per update.

        Same guarantees as :meth:`fold`. With ``check="swap"`` a group is written into the spare
        accumulator and only swapped in if every value is finite. With ``check="precheck"``
        (one accumulator, written in place) every input of a group is checked first, unless
        ``validated`` (one flag for all, or one per item) says ``n·w`` was already checked finite
        (:class:`StreamScan`, while the bytes arrived) or the group is the round's first (it writes the accumulator
        from scratch, so a bad value spoils nothing). A non-finite group is refolded one update
        at a time so exactly the bad update is rejected. Returns one error (or None) per item.

        ``last``: these are the round's last inputs and the model will be divided in place
        (:meth:`finalize_in_place`): if every item folds, the final pass also divides by Σn,
        so the model needs no division pass of its own."""
        entries = []
        for p, n, client in items:
            h = p.header
            segs = None
            if h.kind == "update" and h.layout == self.layout and self._groupable(h.layout, n):
                segs = [
                    (
                        np.frombuffer(p.data, dtype=r.dtype, count=r.count, offset=r.byte_offset),
                        r.elem_offset,
                    )
                    for r in h.layout.runs
                ]
            entries.append((segs, n, client, lambda p=p, client=client: self.fold(p, client)))
        return self._fold_many(entries, validated, last)

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
            entries.append(
                (segs, n, client, lambda m=model, n=n, c=client: self.fold_model(m, n, c))
            )
        return self._fold_many(entries)

    def _groupable(self, layout: Layout, n: Any) -> bool:
        return (
            self.kernels
            and all(r.dtype in FAST for r in layout.runs)
            and isinstance(n, int | np.integer)
            and not isinstance(n, bool)
            and n > 0
        )

    def _fold_many(
        self, entries: list, validated: bool | list[bool] = False, last: bool = False
    ) -> list[Exception | None]:
        """``entries``: (segments or None, n, client, fold-it-alone). Entries without segments
        fold alone (that path raises the precise error); the rest fold in groups of up to 4."""
        ok = validated if isinstance(validated, list) else [validated] * len(entries)
        errs: list[Exception | None] = [None] * len(entries)
        fast: list[int] = []
        for i, (segs, _n, _client, one) in enumerate(entries):
            if segs is not None:
                fast.append(i)
                continue
            try:
                one()
            except UpdateRejected as e:
                errs[i] = e
        while fast:
            group, fast = fast[:4], fast[4:]
            if not (self.check == "swap" or self.count == 0):
                # precheck: the one accumulator is written in place, so check each input first
                group = [i for i in group if ok[i] or self._precheck(entries[i], errs, i)]
                if group:
                    final = last and not fast and not any(errs) and len(group) > 1
                    self._fold_group([(entries[i][0], entries[i][1]) for i in group], final, True)
                continue
            final = last and not fast and not any(errs) and len(group) > 1
            # the round's first pass writes the accumulator from scratch; if every input is
            # known finite it needs no refold, so it may hand its inputs' memory on as it reads
            checked = self.check == "precheck" and all(ok[i] for i in group)
            if not self._fold_group(
                [(entries[i][0], entries[i][1]) for i in group], final, checked
            ):
                for i in group:  # one at a time: pinpoints the bad update, folds the others
                    try:
                        entries[i][3]()
                    except UpdateRejected as e:
                        errs[i] = e
        return errs

    def _precheck(self, entry: tuple, errs: list[Exception | None], i: int) -> bool:
        """One read pass over an input's ``n·w``: False (and its error in ``errs[i]``) if a value
        is not finite."""
        segs, n, client, _one = entry
        scale = self.acc_dtype.type(n)
        for src, eo in segs:
            bad = passes.find_bad(src, scale, self._tmp, self.chunk, self.kernels)
            if bad is not None:
                try:
                    self._reject(eo + bad[0], bad[1], client)
                except UpdateRejected as e:
                    errs[i] = e
                return False
        return True

    def _fold_group(
        self,
        group: list[tuple[list[tuple[np.ndarray, int]], int]],
        divide: bool = False,
        checked: bool = False,
    ) -> bool:
        """One pass over a group (see :meth:`fold_batch`); ``divide``: also divide by the new Σn.
        ``checked`` (precheck mode): every input is known finite, so the pass never reads them
        again and reports its progress to :attr:`reader`. False if a value was not finite and
        the live accumulator is untouched (spare, or the round's first pass)."""
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

        total = self.n + sum(int(n) for _, n in group)
        d = self.acc_dtype.type(total) if divide else None
        watch = self.reader if checked and in_place else None
        front = None
        if watch is not None:
            front = passes.Frontier(
                tasks, srcs, self.threads, lambda upto: watch(starts, upto, False), READ_REPORT
            )
            starts = front.starts()
            watch(starts, starts, False)  # the pass starts: nothing is read yet

        def run(part: list[tuple[int, int, int]], i: int) -> bool:
            """Fold chunks with the fused kernels (nogil: threads run in parallel)."""
            tick = None if front is None else (lambda: front.done(i))
            return passes.fold_group_chunks(
                part, srcs, scales, acc=acc, out=out, first=first, d=d, done=tick
            )

        bad = any(passes.split(run, tasks, self.threads, interleave=front is not None))
        if bad:
            if (not in_place or first) and not checked:
                return False  # the live accumulator is untouched (spare, or still empty)
            # validated inputs: only the sum itself overflowed (as in fold_chunks)
            raise FloatingPointError("accumulator overflow: use acc_dtype=float64")
        if front is not None and watch is not None:
            watch(starts, front.ends(), True)
        if not in_place:
            self._live = 1 - self._live
        self.count += len(group)
        self.n = total
        self.divided = divide
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
