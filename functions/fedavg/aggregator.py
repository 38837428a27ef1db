"""One aggregator role at run time: warm accumulator, per-round counters, hand-off upward.

Shared by the Hearth handlers (one per function instance, kept in module state across
invocations and rounds) and by the in-process :class:`~hearth.functions.fedavg.aggregation.Aggregation`
driver. No I/O: the caller forwards the partial it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hearth.functions.fedavg.fold import Accumulator, Alloc, ReadWatch, UpdateRejected
from hearth.functions.fedavg.foldkernels import warm_kernels
from hearth.functions.fedavg.pack import (
    Header,
    Layout,
    PackError,
    Payload,
    packed_size,
    parse,
    write_header,
)
from hearth.functions.fedavg.rounds import GlobalModel, LateUpdate, RoundBook, RoundError
from hearth.functions.fedavg.tree import Level


@dataclass
class Progress:
    expected: int = 0
    received: int = 0
    folded: int = 0
    rejected: int = 0
    duplicates: int = 0
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "received": self.received,
            "folded": self.folded,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "done": self.done,
        }


@dataclass
class Outcome:
    """What an input caused: nothing yet, a partial to forward, or (top) a published model."""

    partial: memoryview | None = None
    model: GlobalModel | None = None
    progress: Progress = field(default_factory=Progress)
    duplicate: bool = False


class Aggregator:
    def __init__(
        self,
        name: str,
        level: Level,
        parent: str | None,
        expected: int,
        *,
        acc_dtype: Any = np.float32,
        check: str = "swap",
        alloc: Alloc | None = None,
        keep: int = 3,
        on_evict: Callable[[GlobalModel], None] | None = None,
        threads: int = 1,
        publish_in_place: bool = False,
    ):
        warm_kernels()
        self.name, self.level, self.parent = name, level, parent
        self.default_expected = expected
        self.acc_dtype = np.dtype(acc_dtype)
        self.check = check
        self.alloc = alloc
        self.acc: Accumulator | None = (
            None  # created on the first input, reused while the layout holds
        )
        self.accumulators_created = 0
        self.round_id: int | None = None
        self.progress = Progress(expected=expected)
        self.book = RoundBook(keep) if level == "top" else None
        self.on_evict = on_evict
        self.threads = threads
        # top: divide in place, so the published model is the accumulator itself (one buffer
        # less; the caller releases it with release_model() once its broadcast is over)
        self.publish_in_place = publish_in_place
        self._inplace_layers: tuple[Any, list] | None = None
        self._model_bufs: list[memoryview] = []  # buffers of evicted models, reused (warm)
        self.spares: list[Accumulator] | None = None  # shared free list (in-process driver)
        self.seen: set[str] = set()  # clients folded this round: a redelivered update is a no-op
        self.trace: list[np.ndarray] | None = None  # tests: record what the folds read
        # told how far a pass that never reads its inputs again got (Accumulator.reader)
        self.reader: ReadWatch | None = None

    # -- rounds ------------------------------------------------------------------------------
    def open(self, round_id: int, expected: int | None = None) -> None:
        if self.round_id is not None and round_id < self.round_id:
            raise RoundError(
                f"{self.name}: round {round_id} is older than the current round {self.round_id}"
            )
        self.round_id = round_id
        self.progress = Progress(expected=self.default_expected if expected is None else expected)
        self.seen.clear()
        if self.acc is not None:
            self.acc.reset()

    def _admit(self, rnd: int | None, who: str | None) -> None:
        if rnd is None:
            rnd = self.round_id if self.round_id is not None else 0
        if self.round_id is None or (rnd > self.round_id):
            self.open(rnd)  # warm reuse: a newer round simply restarts the counters
        elif rnd < self.round_id:
            raise LateUpdate(
                f"{self.name}: input for round {rnd} arrived during round {self.round_id}; late update{f' from {who!r}' if who else ''} rejected"
            )
        if self.progress.done:
            raise LateUpdate(
                f"{self.name}: round {rnd} is closed here (already forwarded); late update{f' from {who!r}' if who else ''} rejected"
            )

    # -- inputs ------------------------------------------------------------------------------
    def _ensure(self, layout: Layout) -> Accumulator:
        acc = self.acc
        if acc is not None and acc.count == 0 and acc.layout != layout:
            if not acc.layout.mismatch(layout):
                acc.layout = layout  # only dtypes differ: same buffers, new output dtypes
            else:
                acc = None  # a different model: new buffers
        if acc is None and self.spares:
            for i, sp in enumerate(self.spares):
                if sp.total == layout.total and not sp.layout.mismatch(layout):
                    acc = self.spares.pop(i)
                    acc.layout = layout
                    acc.reset()
                    break
        if acc is None:
            acc = Accumulator(
                layout,
                acc_dtype=self.acc_dtype,
                check=self.check,
                alloc=self.alloc,
                threads=self.threads,
            )  # type: ignore[arg-type]
            self.accumulators_created += 1
        self.acc = acc
        return acc

    def ingest(self, payload: Payload | Any) -> Outcome:
        """Fold one packed input (a client update at a leaf, a partial above)."""
        try:
            p = payload if isinstance(payload, Payload) else parse(payload)
        except PackError as e:
            self.progress.rejected += 1
            raise UpdateRejected(str(e)) from None
        h = p.header
        want = (
            "update"
            if self.level == "leaf" or (self.level == "top" and h.kind == "update")
            else "partial"
        )
        if h.kind != want:
            raise UpdateRejected(
                f"{self.name} ({self.level}) takes {want} payloads, got {h.kind!r}", h.client
            )
        if (
            h.kind == "update"
            and h.client is not None
            and h.client in self.seen
            and h.round == self.round_id
        ):
            # at-least-once delivery (stream redelivery, HTTP retry): already folded, not again
            self.progress.duplicates += 1
            return Outcome(progress=self.progress, duplicate=True)
        self._admit(h.round, h.client)
        self.progress.received += 1
        template = h.layout if h.kind == "partial" else self._template_for(h.layout)
        acc = self._ensure(template)
        acc.trace = self.trace
        try:
            acc.fold(p)
        except UpdateRejected:
            self.progress.received -= 1
            self.progress.rejected += 1
            raise
        self.progress.folded += 1
        if h.kind == "update" and h.client is not None:
            self.seen.add(h.client)
        return self._maybe_finish()

    def ingest_batch(
        self, payloads: list[Any], validated: bool | list[bool] = False
    ) -> tuple[Outcome, list[Exception | None]]:
        """Fold several queued client updates in grouped passes (see ``Accumulator.fold_batch``;
        ``validated``, for all or per payload: checked finite as it arrived). Returns the
        outcome after the batch and one error (or None) per payload."""
        ok = validated if isinstance(validated, list) else [validated] * len(payloads)
        errs: list[Exception | None] = [None] * len(payloads)
        todo: list[tuple[int, Payload]] = []
        for i, raw in enumerate(payloads):
            try:
                p = raw if isinstance(raw, Payload) else parse(raw)
                h = p.header
                if h.kind != "update":
                    raise UpdateRejected(
                        f"{self.name} takes update payloads here, got {h.kind!r}", h.client
                    )
                if h.client is not None and h.client in self.seen and h.round == self.round_id:
                    self.progress.duplicates += 1
                    continue
                self._admit(h.round, h.client)
            except PackError as e:
                self.progress.rejected += 1
                errs[i] = UpdateRejected(str(e))
                continue
            except (UpdateRejected, RoundError) as e:
                errs[i] = e
                continue
            todo.append((i, p))
        if todo:
            acc = self._ensure(self._template_for(todo[0][1].header.layout))
            acc.trace, acc.reader = self.trace, self.reader
            self.progress.received += len(todo)
            # the round's last inputs into a top that divides in place: the pass divides too
            last = (
                self.publish_in_place
                and self.progress.folded + len(todo) == self.progress.expected
                and acc.can_finalize_in_place()
            )
            res = acc.fold_batch(
                [(p, p.header.n, p.header.client) for _, p in todo],
                [ok[i] for i, _ in todo],
                last=last,
            )
            for (i, p), e in zip(todo, res, strict=True):
                if e is None:
                    self.progress.folded += 1
                    if p.header.client is not None:
                        self.seen.add(p.header.client)
                else:
                    self.progress.received -= 1
                    self.progress.rejected += 1
                    errs[i] = e
        return self._maybe_finish(), errs

    def ingest_models_batch(
        self, items: list[tuple[Any, int, str | None]], *, round: int | None = None
    ) -> tuple[Outcome, list[Exception | None]]:
        """Fold several in-memory models (arrays, e.g. Flower results) in grouped passes."""
        errs: list[Exception | None] = [None] * len(items)
        todo: list[int] = []
        for i, (model, _n, client) in enumerate(items):
            try:
                if client is not None and client in self.seen and round == self.round_id:
                    self.progress.duplicates += 1
                    continue
                self._admit(round, client)
                Layout.of(model)
            except PackError as e:
                self.progress.rejected += 1
                errs[i] = UpdateRejected(str(e), client)
                continue
            except RoundError as e:
                errs[i] = e
                continue
            todo.append(i)
        if todo:
            acc = self._ensure(self._template_for(Layout.of(items[todo[0]][0])))
            acc.trace = self.trace
            self.progress.received += len(todo)
            res = acc.fold_models_batch([items[i] for i in todo])
            for i, e in zip(todo, res, strict=True):
                if e is None:
                    self.progress.folded += 1
                    if items[i][2] is not None:
                        self.seen.add(items[i][2])  # type: ignore[arg-type]
                else:
                    self.progress.received -= 1
                    self.progress.rejected += 1
                    errs[i] = e
        return self._maybe_finish(), errs

    def ingest_model(
        self, model: Any, n: int, *, round: int | None = None, client: str | None = None
    ) -> Outcome:
        """Fold arrays already in memory (a leaf's alternative to a packed payload): the fold
        reads the caller's arrays through views, nothing is packed or copied."""
        if self.level != "leaf" and self.level != "top":
            raise UpdateRejected(
                f"{self.name} ({self.level}) takes partials, not client updates", client
            )
        try:
            layout = Layout.of(model)
        except PackError as e:
            raise UpdateRejected(str(e), client) from None
        self._admit(round, client)
        self.progress.received += 1
        acc = self._ensure(self._template_for(layout))
        acc.trace = self.trace
        try:
            acc.fold_model(model, n, client=client)
        except UpdateRejected:
            self.progress.received -= 1
            self.progress.rejected += 1
            raise
        self.progress.folded += 1
        return self._maybe_finish()

    def _template_for(self, layout: Layout) -> Layout:
        """An update's layout as the accumulator template: the current one when only float
        dtypes differ (fp16 and fp32 clients mix in one round), else the update's own."""
        if self.acc is not None and self.acc.count > 0 and not self.acc.layout.mismatch(layout):
            return self.acc.layout
        return layout

    def adopt(self, other: Aggregator) -> None:
        """Promotion: take over ``other``'s accumulator as our first input (no data moves)."""
        if other.acc is None or other.acc.count == 0:
            raise ValueError(f"{other.name} has nothing to hand over")
        self._admit(other.round_id, other.name)
        mine = self.acc
        self.acc, other.acc = other.acc, mine
        self.acc.count = 1  # one input (the leaf's partial) from our point of view
        self.progress.received += 1
        self.progress.folded += 1
        other.progress.done = True

    def _maybe_finish(self) -> Outcome:
        if self.progress.folded < self.progress.expected:
            return Outcome(progress=self.progress)
        return self.finish()

    def finish(self) -> Outcome:
        """Forward what we have (end of inputs, or the deadline). Top: divide and publish."""
        self.progress.done = True
        assert self.acc is not None
        if self.acc.count == 0:
            return Outcome(progress=self.progress)
        if self.level != "top":
            return Outcome(partial=self.acc.partial(self.round_id), progress=self.progress)
        return Outcome(model=self._publish(), progress=self.progress)

    def flush(self) -> Outcome:
        """Deadline: forward (or publish) whatever was folded, even if inputs are missing."""
        if self.progress.done:
            return Outcome(progress=self.progress)
        if self.acc is None or self.acc.count == 0:
            self.progress.done = True
            return Outcome(progress=self.progress)
        return self.finish()

    def _publish(self) -> GlobalModel:
        assert self.acc is not None and self.book is not None
        olay = self.acc.layout.output()
        if self.publish_in_place and self.acc.can_finalize_in_place():
            for old in self.book.publish(self._model_in_place()):
                self._recycle(old)
            return self.book.model(self.round_id)
        h = Header("model", self.acc.n, olay, round=self.round_id)
        size = packed_size(h)
        # the oldest kept model is replaced now (not after the new one exists): its buffer is
        # reused, so a warm top allocates nothing and touches no fresh pages
        while len(self.book.models) >= self.book.keep:
            self._recycle(self.book.models.popitem(last=False)[1])
        buf = next((b for b in self._model_bufs if len(b) >= size), None)
        if buf is not None:
            self._model_bufs.remove(buf)  # an evicted model's buffer: no allocation, no page faults
        else:
            raw = self.alloc(size) if self.alloc else bytearray(size)
            buf = (
                memoryview(raw).cast("B")
                if not isinstance(raw, memoryview) or raw.format != "B"
                else raw
            )
        off = write_header(buf, h)
        layers = self.acc.finalize(out=buf[off : off + olay.data_nbytes])
        payload = buf if len(buf) == size else buf[:size]
        model = GlobalModel(
            self.round_id or 0,
            self.acc.n,
            layers,
            payload=payload,
            contributors=self.progress.folded,
        )
        for old in self.book.publish(model):
            self._recycle(old)
        return model

    def _model_in_place(self) -> GlobalModel:
        assert self.acc is not None
        payload = self.acc.finalize_in_place(self.round_id)
        # same buffer and layout as last round: the same layer views (no new objects per round)
        key = (id(self.acc), self.acc.reserve, self.acc.layout)
        if self._inplace_layers is None or self._inplace_layers[0] != key:
            self._inplace_layers = (key, parse(payload).layers())
        return GlobalModel(
            self.round_id or 0,
            self.acc.n,
            self._inplace_layers[1],
            payload=payload,
            contributors=self.progress.folded,
        )

    @property
    def model_held(self) -> bool:
        return self.acc is not None and self.acc.model_held

    def release_model(self) -> None:
        """The in-place model's broadcast is over: its buffer becomes the next round's sum (the
        model is no longer readable from this aggregator)."""
        if self.acc is not None and self.acc.model_held:
            self.acc.release_model()
            assert self.book is not None
            self.book.models.clear()

    def _recycle(self, old: GlobalModel) -> None:
        if old.payload is not None and self.acc is not None and self.publish_in_place:
            if any(_same_buffer(old.payload, b) for b in self.acc.buffers):
                return  # an in-place model: its buffer is the accumulator, never a model buffer
        if self.on_evict:
            self.on_evict(old)
        elif isinstance(old.payload, memoryview):
            self._model_bufs.append(old.payload)

    def status(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "level": self.level,
            "round": self.round_id,
            **self.progress.to_dict(),
        }
        d["accumulators_created"] = self.accumulators_created
        d["accumulator_bytes"] = self.acc.nbytes if self.acc else 0
        if self.book is not None:
            d["models"] = list(self.book.models)
        return d


def _same_buffer(a: Any, b: memoryview) -> bool:
    try:
        return np.shares_memory(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    except (TypeError, ValueError):
        return False
