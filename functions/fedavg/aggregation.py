"""In-process aggregation tree: the same aggregators the handlers run, wired by direct calls.

Used by tests, ``hearth fl simulate`` and the benchmark, and a reference for how the platform
wires the handlers: an update is written once into a shared-memory slot (the gateway's job; here
:meth:`Aggregation.ingest` plays it), the leaf folds it from a view of that slot, the slot is
released as soon as it is folded, and partials travel upward as views of the child's
accumulator (a descriptor's worth of work, no bytes copied).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hearth.functions.fedavg.aggregator import Aggregator, Outcome
from hearth.functions.fedavg.fold import UpdateRejected
from hearth.functions.fedavg.pack import Header, Layout, named_layers, pack_into, packed_size, parse
from hearth.functions.fedavg.rounds import GlobalModel, Round, RoundBook, RoundError
from hearth.functions.fedavg.tree import PlanError, TreePlan

try:  # the node's shared-memory slot pool (hearth.dataplane)
    from hearth.dataplane.shm import SlotPool
except ImportError:  # pragma: no cover - the data plane ships with the platform
    SlotPool = None  # type: ignore[assignment,misc]


@dataclass
class Ingested:
    """An update sitting in a slot, ready for its leaf (what a gateway descriptor names)."""

    view: memoryview
    node: str
    client: str
    slot: Any = None  # dataplane Slot (released after the fold) or None for plain buffers


@dataclass
class MemoryMeter:
    """Counts model-sized buffers alive at once per aggregator (accumulators + inputs held)."""

    model_bytes: int = 0
    live: Counter = field(default_factory=Counter)
    peak: Counter = field(default_factory=Counter)

    def add(self, who: str, nbytes: int) -> None:
        self.live[who] += nbytes
        self.peak[who] = max(self.peak[who], self.live[who])

    def sub(self, who: str, nbytes: int) -> None:
        self.live[who] -= nbytes

    def peak_models(self, who: str) -> float:
        return self.peak[who] / self.model_bytes if self.model_bytes else 0.0


class Aggregation:
    """A warm aggregation tree for a plan; run rounds on it with :meth:`start_round`."""

    def __init__(
        self,
        plan: TreePlan,
        *,
        pool: Any = None,
        acc_dtype: Any = np.float32,
        check: str = "swap",
        promote: bool = True,
        keep: int = 3,
        clock: Callable[[], float] = time.time,
        threads: int = 1,
        acc_in_pool: bool = False,
        publish_in_place: bool = False,
    ):
        self.plan = plan
        self.pool = pool
        # Accumulators and published models live in private memory by default: in one process a
        # partial is handed upward as a view either way, and anonymous memory gets transparent
        # huge pages (far fewer first-touch faults than tmpfs). acc_in_pool=True puts them in
        # slots, as aggregators in separate processes need for a descriptor hand-off.
        self.acc_in_pool = acc_in_pool
        self.promote = promote
        self.clock = clock
        self.meter = MemoryMeter()
        self._slots: dict[int, Any] = {}  # id(buffer) -> slot, for accumulator buffers in the pool
        self.aggs: dict[str, Aggregator] = {}
        for r in plan.roles:
            self.aggs[r.name] = Aggregator(
                r.name,
                r.level,
                r.parent,
                r.inputs,
                acc_dtype=acc_dtype,
                check=check,
                alloc=self._alloc_for(r.name),
                keep=keep,
                threads=threads,
                publish_in_place=publish_in_place and r.parent is None,
            )
        self.spares: list = []  # accumulators handed back after promotions moved them upward
        for a in self.aggs.values():
            a.spares = self.spares
        self.book = RoundBook(keep)
        self.round: Round | None = None
        self._per_node: Counter = Counter()
        self._leaf_load: Counter = Counter()
        self.first_input_at: float | None = None
        self.model_at: float | None = None
        self.promotions: list[tuple[str, str]] = []

    # -- memory ------------------------------------------------------------------------------
    def _alloc_for(self, who: str) -> Callable[[int], memoryview]:
        def alloc(nbytes: int) -> memoryview:
            self.meter.add(who, nbytes)
            if self.pool is not None and self.acc_in_pool:
                slot = self.pool.alloc(nbytes)
                mv = slot.buf[:nbytes]
                self._slots[id(mv)] = slot
                return mv
            return memoryview(np.empty(nbytes, np.uint8)).cast("B")

        return alloc

    def slot_of(self, buf: Any) -> tuple[Any, int] | None:
        """The pool slot holding ``buf`` (an accumulator or a model in it) and ``buf``'s offset
        in that slot, or None if ``buf`` is private memory."""
        addr = np.frombuffer(buf, np.uint8).ctypes.data
        for slot in self._slots.values():
            base = np.frombuffer(slot.buf, np.uint8).ctypes.data
            if base <= addr < base + slot.capacity:
                return slot, addr - base
        return None

    def close(self) -> None:
        """Release every slot the aggregators hold (accumulators, kept models)."""
        for slot in self._slots.values():
            try:
                slot.release()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._slots.clear()

    # -- rounds ------------------------------------------------------------------------------
    def start_round(
        self,
        round_id: int,
        *,
        deadline: float | None = None,
        min_fraction: float = 1.0,
        clients: list[str] | None = None,
    ) -> Round:
        if self.round is not None and self.round.state == "open":
            raise RoundError(f"round {self.round.round_id} is still open")
        now = self.clock()
        rnd = Round(
            round_id,
            self.plan.expected,
            deadline if deadline is not None else now + 3600.0,
            min_fraction,
            frozenset(clients) if clients else None,
        )
        self.book.open(rnd)
        self.round = rnd
        self._per_node.clear()
        self._leaf_load.clear()
        self.first_input_at = self.model_at = None
        # promotions moved leaf accumulators upward; hand them back so no leaf allocates again
        for a in self.aggs.values():
            if a.level != "leaf" and a.acc is not None and self.plan.levels > 1:
                self.spares.append(a.acc)
                a.acc = None
        for a in self.aggs.values():
            a.open(round_id)
        return rnd

    def ingest(self, model: Any, n: int, *, client: str, node: str | None = None) -> Ingested:
        """The gateway's part: write the client's arrays once into a slot (one copy, from the
        client's memory into shared memory). Returns the slot view the leaf will fold."""
        node = node or self.plan.nodes[0][0]
        layers = named_layers(model)
        rid = self.round.round_id if self.round else None
        h = Header("update", int(n), Layout.of(layers), rid, client)
        size = packed_size(h)
        slot = None
        if self.pool is not None:
            slot = self.pool.alloc(size)
            view = slot.buf[:size]
        else:
            view = memoryview(np.empty(size, np.uint8)).cast("B")
        pack_into(view, layers, n, round=rid, client=client)
        return Ingested(view, node, client, slot)

    def _leaf_for(self, node: str) -> Aggregator:
        try:
            role = self.plan.leaf_for(node, self._per_node[node])
        except PlanError:
            # more updates at this node than planned: any leaf with room, same node first
            spare = [r for r in self.plan.entry_roles() if self._leaf_load[r.name] < r.inputs]
            spare.sort(key=lambda r: r.node != node)
            if not spare:
                raise RoundError(
                    f"no leaf has room for another update (expected {self.plan.expected})"
                ) from None
            role = spare[0]
        return self.aggs[role.name]

    def submit(self, item: Ingested) -> Outcome:
        """Route an ingested update to its leaf, fold it, release its slot, cascade upward."""
        if self.round is None:
            raise RoundError("no round started")
        rnd = self.round
        now = self.clock()
        try:
            rnd.accept(item.client, now)
        except RoundError:
            self._release(item)
            raise
        if self.first_input_at is None:
            self.first_input_at = time.perf_counter()
        leaf = self._leaf_for(item.node)
        self.meter.add(leaf.name, len(item.view))
        try:
            out = leaf.ingest(item.view)
        except (UpdateRejected, RoundError) as e:
            rnd.reject(item.client, str(e))
            raise
        finally:
            self.meter.sub(leaf.name, len(item.view))
            self._release(item)  # folded (or refused): the slot goes back at once
        self._per_node[item.node] += 1
        self._leaf_load[leaf.name] += 1
        return self._cascade(leaf, out)

    def submit_many(
        self, items: list[Ingested], validated: bool | list[bool] = False
    ) -> list[Exception | None]:
        """A burst of updates already in slots (queued while the leaves were busy): each leaf
        folds its share in grouped passes, slots are released, partials cascade. Returns one
        error (or None) per item instead of raising, so one bad update does not stop the rest.
        ``validated`` (for all, or per item): checked finite as it arrived (``StreamScan``)."""
        ok = validated if isinstance(validated, list) else [validated] * len(items)
        if self.round is None:
            raise RoundError("no round started")
        who = [(it.client, it.node) for it in items]
        errs, by_leaf = self._admit_burst(who, lambda i: self._release(items[i]))
        for name, idx in by_leaf.items():
            leaf = self.aggs[name]
            for i in idx:
                self.meter.add(name, len(items[i].view))
            try:
                out, res = leaf.ingest_batch([items[i].view for i in idx], [ok[i] for i in idx])
            finally:
                for i in idx:
                    self.meter.sub(name, len(items[i].view))
                    self._release(items[i])
            self._refuse_burst(name, idx, res, who, errs)
            self._cascade(leaf, out)
        return errs

    def submit_models(
        self, items: list[tuple[Any, int, str, str | None]]
    ) -> list[Exception | None]:
        """A burst of in-memory models ``(model, n, client, node)``: grouped folds per leaf."""
        if self.round is None:
            raise RoundError("no round started")
        rnd = self.round
        who = [(client, node or self.plan.nodes[0][0]) for _m, _n, client, node in items]
        errs, by_leaf = self._admit_burst(who, lambda i: None)
        for name, idx in by_leaf.items():
            leaf = self.aggs[name]
            out, res = leaf.ingest_models_batch(
                [(items[i][0], items[i][1], items[i][2]) for i in idx], round=rnd.round_id
            )
            self._refuse_burst(name, idx, res, who, errs)
            self._cascade(leaf, out)
        return errs

    def _admit_burst(
        self, who: list[tuple[str, str]], refused: Callable[[int], None]
    ) -> tuple[list[Exception | None], dict[str, list[int]]]:
        """Admit a burst of (client, node) to the round and group it by leaf: (one error or
        None per item, leaf name -> item indexes). `refused(i)` cleans up a refused item."""
        assert self.round is not None
        rnd, now = self.round, self.clock()
        errs: list[Exception | None] = [None] * len(who)
        by_leaf: dict[str, list[int]] = {}
        for i, (client, node) in enumerate(who):
            try:
                rnd.accept(client, now)
            except RoundError as e:
                errs[i] = e
                refused(i)
                continue
            leaf = self._leaf_for(node)
            self._per_node[node] += 1
            self._leaf_load[leaf.name] += 1
            by_leaf.setdefault(leaf.name, []).append(i)
        if self.first_input_at is None:
            self.first_input_at = time.perf_counter()
        return errs, by_leaf

    def _refuse_burst(
        self,
        leaf: str,
        idx: list[int],
        res: list[Exception | None],
        who: list[tuple[str, str]],
        errs: list[Exception | None],
    ) -> None:
        """Updates a leaf refused while folding a burst: the round hears it, counts undone."""
        assert self.round is not None
        for i, e in zip(idx, res, strict=True):
            if e is not None:
                errs[i] = e
                self.round.reject(who[i][0], str(e))
                self._per_node[who[i][1]] -= 1
                self._leaf_load[leaf] -= 1

    def submit_model(self, model: Any, n: int, *, client: str, node: str | None = None) -> Outcome:
        """Fold arrays already in this process (e.g. Flower's deserialised results) at their
        leaf without packing them into a slot first."""
        if self.round is None:
            raise RoundError("no round started")
        node = node or self.plan.nodes[0][0]
        rnd = self.round
        rnd.accept(client, self.clock())
        if self.first_input_at is None:
            self.first_input_at = time.perf_counter()
        leaf = self._leaf_for(node)
        try:
            out = leaf.ingest_model(model, n, round=rnd.round_id, client=client)
        except (UpdateRejected, RoundError) as e:
            rnd.reject(client, str(e))
            raise
        self._per_node[node] += 1
        self._leaf_load[leaf.name] += 1
        return self._cascade(leaf, out)

    def _release(self, item: Ingested) -> None:
        if item.slot is not None:
            item.slot.release()
            item.slot = None

    def _cascade(self, agg: Aggregator, out: Outcome) -> Outcome:
        while out.partial is not None:
            parent = self.aggs[agg.parent]  # type: ignore[index]
            prole = self.plan.role(parent.name)
            same_node = self.plan.role(agg.name).node == prole.node
            if self.promote and parent.progress.folded == 0 and same_node:
                # the first finished child carries its parent (same node): no data moves
                parent.adopt(agg)
                self.promotions.append((agg.name, parent.name))
                out = parent._maybe_finish()
                agg = parent
                continue
            out = parent.ingest(out.partial)  # a view of the child's accumulator: zero copy
            agg = parent
        if out.model is not None:
            self._published(out.model)
        return out

    def _published(self, model: GlobalModel) -> None:
        self.model_at = time.perf_counter()
        self.book.publish(model)
        if self.round is not None and self.round.state == "open":
            self.round.close(self.clock())

    def expire(self, now: float | None = None) -> Round:
        """Deadline: close with what arrived if the quorum is met (flush bottom-up), else fail."""
        assert self.round is not None
        rnd = self.round
        now = self.clock() if now is None else now
        state = rnd.expire(now)
        if state == "closed" and not self.book.models.get(rnd.round_id):
            for level in ("leaf", "middle", "top"):
                for r in self.plan.by_level(level):  # type: ignore[arg-type]
                    a = self.aggs[r.name]
                    if a.progress.done:
                        continue
                    self._cascade(a, a.flush())
        return rnd

    # -- results -----------------------------------------------------------------------------
    def model(self, round_id: int | None = None) -> GlobalModel:
        return self.book.model(round_id)

    def progress(self) -> dict[str, dict[str, int]]:
        """Per level: inputs expected / received / folded (for progress bars)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.plan.roles:
            p = self.aggs[r.name].progress
            d = out.setdefault(r.level, {"expected": 0, "received": 0, "folded": 0, "rejected": 0})
            d["expected"] += p.expected
            d["received"] += p.received
            d["folded"] += p.folded
            d["rejected"] += p.rejected
        return out

    def run_round(
        self, round_id: int, updates: list[tuple[Any, int]], *, nodes: list[str] | None = None
    ) -> GlobalModel:
        """Convenience: start a round, ingest + submit every ``(model, n)``, return the model."""
        self.start_round(round_id)
        for i, (m, n) in enumerate(updates):
            node = nodes[i] if nodes else None
            self.submit(self.ingest(m, n, client=f"c{i}", node=node))
        return self.model(round_id)


def exact_fedavg(updates: list[tuple[Any, int]]) -> list[tuple[str, np.ndarray]]:
    """Reference FedAvg in float64 (for checks): Σnᵢwᵢ / Σnᵢ per layer."""
    total = sum(n for _, n in updates)
    first = named_layers(updates[0][0])
    out = []
    for li, (name, _) in enumerate(first):
        s = np.zeros(first[li][1].shape, np.float64)
        for m, n in updates:
            s += named_layers(m)[li][1].astype(np.float64) * n
        out.append((name, s / total))
    return out


def parse_model(payload: Any) -> GlobalModel:
    """A downloaded model payload back into named layers (views of the payload)."""
    p = parse(payload)
    if p.header.kind != "model":
        raise UpdateRejected(f"expected a model payload, got {p.header.kind!r}")
    return GlobalModel(p.header.round or 0, p.header.n, p.layers(), payload=payload)
