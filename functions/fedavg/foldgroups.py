"""Grouped passes of an :class:`~hearth.functions.fedavg.fold.Accumulator`: several queued
updates folded reading and writing the accumulator once per group of up to 4, instead of once
per update.

Why: a fold is bound by memory traffic, and the accumulator is half of it; a group of 4 reads
it once for 4 updates. The guarantees stay those of a single fold: a group is written into the
spare accumulator (``check="swap"``) or its inputs are known finite (``check="precheck"``), and
a group with a value that is not finite is refolded one update at a time, so exactly the bad
update is rejected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hearth.functions.fedavg import foldpasses as passes
from hearth.functions.fedavg.foldkernels import FAST, KERNEL_CHUNK
from hearth.functions.fedavg.foldtypes import (
    DEFAULT_CHUNK,
    FoldStats,
    ReadWatch,
    UpdateRejected,
)
from hearth.functions.fedavg.pack import Layout, PackError, Payload

READ_REPORT = 1 << 20  # elements a pass reads between two reports to its ReadWatch


class GroupFolds:
    """The grouped folding methods of the accumulator (a mixin: the state lives in
    ``Accumulator``; single folds, :meth:`_reject` and :meth:`_writable` too)."""

    layout: Layout
    acc_dtype: np.dtype
    check: str
    chunk: int
    threads: int
    kernels: bool
    count: int
    n: int
    divided: bool
    stats: FoldStats
    trace: list[np.ndarray] | None
    reader: ReadWatch | None
    _acc: list[np.ndarray]
    _tmp: np.ndarray
    _live: int

    def fold(self, payload: Payload | Any, client: str | None = None) -> None:  # pragma: no cover
        raise NotImplementedError  # defined by Accumulator

    def fold_model(self, model: Any, n: int, client: str | None = None) -> None:  # pragma: no cover
        raise NotImplementedError  # defined by Accumulator

    def _reject(
        self, elem0: int, chunk: np.ndarray, client: str | None
    ) -> None:  # pragma: no cover
        raise NotImplementedError  # defined by Accumulator

    def _writable(self) -> None:  # pragma: no cover
        raise NotImplementedError  # defined by Accumulator

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
