"""The fold thread of the round endpoint: updates complete in their slots are folded by the
aggregation tree in arrival order, and a round's model is published once every expected update
is folded (or refused), the last expected client left, or the round's deadline passed.

One thread does every fold and every publish, so rounds never interleave in the tree; the
connection threads only queue ``(round, Ingested | None, validated)`` items. ``None`` asks the
thread to re-check a round (a client left, the deadline passed) in order with the folds.

The top aggregator divides in place, so the accumulator's slot *is* the published model: the
next round's first fold waits until every client that was sent the previous model has
acknowledged it (its pages may be read by reference by ``sendfile``), and every client on the
shared-memory path that reads it in place has released it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from hearth.functions.fedavg import wire
from hearth.functions.fedavg.aggregation import Aggregation, Ingested
from hearth.functions.fedavg.rounds import RoundError
from hearth.functions.fedavg.roundstate import RoundState, RoundTable
from hearth.functions.fedavg.tree import TreePlan
from hearth.functions.fedavg.warm import thread_faults

FoldItem = tuple[int, Ingested | None, bool]  # (round, update in its slot or None, validated)
log = logging.getLogger(__name__)

GATHER_S = 0.05  # longest wait for updates still landing before a pass starts without them


class Folder:
    """Folds queued updates into ``plan``'s aggregation tree and publishes each round's model."""

    def __init__(
        self,
        table: RoundTable,
        plan: TreePlan,
        *,
        pool: Any,
        acc_dtype: Any,
        fan_in: int,
        stop: threading.Event,
        threads: int = 1,
    ):
        self.table, self.plan, self.pool, self.fan_in, self._stop = table, plan, pool, fan_in, stop
        # one accumulator per aggregator ("precheck": updates arrive validated) that becomes the
        # model in place, all in pool slots so the model can be sent with sendfile
        self.agg = Aggregation(
            plan,
            pool=pool,
            acc_dtype=acc_dtype,
            check="precheck",
            keep=1,
            acc_in_pool=True,
            publish_in_place=True,
            threads=threads,  # a grouped fold and the division split over this many threads
        )
        self.top = self.agg.aggs[plan.top.name]
        self.q: queue.Queue[FoldItem | None] = queue.Queue()
        self.thread_id: int | None = None
        # updates being received into a slot right now (set by the server: RecvSlots.arriving)
        self.arriving: Callable[[], int] = lambda: 0

    def put(self, item: FoldItem) -> None:
        self.q.put(item)

    def poke(self, round_id: int) -> None:
        """Re-check a round in order with the folds (a client left, the deadline passed)."""
        self.q.put((round_id, None, True))

    def stop(self) -> None:
        self.q.put(None)

    def acc_handles(self) -> list[tuple[int, int]]:
        """(index, gen) of the accumulator slots (the model is read from them)."""
        return [(s.index, s.gen) for s in self.agg._slots.values()]

    def close(self) -> None:
        self.agg.close()

    # -- the thread ---------------------------------------------------------------------------
    def loop(self) -> None:
        self.thread_id = threading.get_native_id()
        while not self._stop.is_set():
            item = self.q.get()
            if item is None:
                return
            batch = self._gather(item)
            f0 = thread_faults()
            for rid in sorted({b[0] for b in batch}):
                part = [b for b in batch if b[0] == rid]
                try:
                    self._fold_round(rid, part)
                except Exception as e:  # a bug in a fold pass or the publish: see _fail_round
                    self._fail_round(rid, part, e)
            f1 = thread_faults()
            r = self.table.find(batch[0][0])
            if r is not None:
                fs = r.stats
                fs.fold_faults = (
                    fs.fold_faults[0] + f1[0] - f0[0],
                    fs.fold_faults[1] + f1[1] - f0[1],
                )

    def _gather(self, item: FoldItem) -> list[FoldItem]:
        """Up to ``fan_in`` queued items for one pass. While updates are still landing in their
        slots, wait for them (at most ``GATHER_S``): a pass reads and writes the accumulator
        once however many updates it folds, so a pass of 4 moves far fewer bytes than 4 of 1."""
        batch = [item]
        until = time.monotonic() + GATHER_S
        while len(batch) < max(1, self.fan_in):
            try:
                nxt = self.q.get_nowait()
            except queue.Empty:
                left = until - time.monotonic()
                if left <= 0 or not self.arriving():
                    break
                try:  # short waits: an update that fails to land is noticed soon
                    nxt = self.q.get(timeout=min(left, 0.002))
                except queue.Empty:
                    continue
            if nxt is None:
                self.q.put(None)
                break
            batch.append(nxt)
        return batch

    def deadline(self, round_id: int) -> None:
        """Round deadline: publish what was folded (the fold thread decides, in order)."""
        self.poke(round_id)
        with self.table.lock:
            r = self.table.rounds.get(round_id)
            if r is not None:
                r.forced = True

    def _fold_round(self, rid: int, batch: list[FoldItem]) -> None:
        r = self.table.get(rid)
        items = [it for _rid, it, _ok in batch if it is not None]  # None: a re-check
        if r.failed is not None:  # an update that arrived after the round failed
            for it in items:
                self._refuse(r, it, r.failed)
            return
        if not items:
            self._maybe_publish(r)
            return
        cur = self.agg.round
        if cur is None or cur.round_id != rid:
            self._wait_released(self.table.current)
            try:
                # any sound update is a quorum when the round has to close early
                self.agg.start_round(rid, min_fraction=1.0 / self.table.clients)
            except RoundError as e:
                for it in items:
                    self._refuse(r, it, str(e))
                return
        # one call: the accumulator checks the unchecked ones only where it must (not in the
        # round's first group, which writes the accumulator from scratch)
        checked = [ok for _rid, it, ok in batch if it is not None]
        with self.table.lock:
            r.fold_started = True
        errs = self.agg.submit_many(items, validated=checked)
        for it, e in zip(items, errs, strict=True):
            if e is not None:
                r.errors[it.client] = str(e)
                r.stats.rejected += 1
            else:
                r.stats.folded += 1
        self._maybe_publish(r)

    def _fail_round(self, rid: int, batch: list[FoldItem], exc: Exception) -> None:
        """An unexpected error while folding or publishing round ``rid``: the round fails (its
        accumulator may hold a partial or double-counted sum, so no model is published from
        it), every client waiting for it gets the reason, the batch's slots go back, and the
        thread goes on. The next round starts a fresh accumulator (``start_round`` resets every
        aggregator), so one bad round does not end an aggregation that may run for hours."""
        why = f"internal error: {type(exc).__name__}: {exc}"
        log.error("fedavg round endpoint: round %d failed: %s", rid, why, exc_info=exc)
        for _rid, it, _ok in batch:
            if it is not None and it.slot is not None:
                it.slot.release()
                it.slot = None
        rnd = self.agg.round
        if rnd is not None and rnd.round_id == rid:
            rnd.fail(time.time(), why)
        r = self.table.find(rid)
        if r is None or (r.published.is_set() and r.failed is None):
            return  # already answered: its clients have the model
        with self.table.lock:
            r.failed = why
            r.model = r.model_file = r.model_slot = None
            self.table.last_failed = max(self.table.last_failed, rid)
        r.published.set()
        self.table.notify()

    def _refuse(self, r: RoundState, it: Ingested, why: str) -> None:
        r.errors[it.client] = why
        r.stats.rejected += 1
        if it.slot is not None:
            it.slot.release()
            it.slot = None
        self._maybe_publish(r)

    def _wait_released(self, prev: RoundState | None) -> None:
        """Before a new round writes the accumulator: the previous model's readers are done."""
        if prev is None:
            return
        t = self.table
        deadline = time.monotonic() + (t.round_timeout or float("inf"))
        with t.cond:
            # pages sent with sendfile are read by reference until the client has read them;
            # the initial model (round 0) is kept until every client has it to start from.
            # Readers are the clients it was sent to *and* every client that submitted to it:
            # a session thread adds itself to `sending` only once it wakes after the publish,
            # and the next round must not write the model before that late reader has it.
            while not self._stop.is_set() and (
                any(c in t.conns and c not in prev.acked for c in prev.sending | prev.submitted)
                or any(c in t.conns for c in prev.holding)  # read in place until released
                or (
                    prev.stats.round == 0
                    and len(prev.acked) < t.clients
                    and time.monotonic() < deadline
                )
            ):
                t.cond.wait(1.0)
            prev.released = True
        self.top.release_model()

    # -- publishing ---------------------------------------------------------------------------
    def publish_initial(self, model: Any) -> None:
        """Round 0: the initial model, held in the accumulator like any published model."""
        self.agg.start_round(0, min_fraction=1.0 / self.table.clients)
        errs = self.agg.submit_models([(model, 1, "initial", None)])
        if errs[0] is not None:
            raise ValueError(f"initial model: {errs[0]}")
        rnd = self.agg.round
        assert rnd is not None
        self.agg.expire(now=rnd.deadline + 1)
        self._set_model(self.table.get(0))

    def _maybe_publish(self, r: RoundState) -> None:
        if r.published.is_set():
            return
        done = r.stats.folded + r.stats.rejected
        if done < len(r.submitted) or (done < r.expected and not r.forced):
            return  # updates in flight, or clients still to submit (before the deadline)
        try:
            self.agg.model(r.stats.round)
        except RoundError:
            rnd = self.agg.round
            if rnd is not None and rnd.round_id == r.stats.round and r.stats.folded:
                self.agg.expire(now=rnd.deadline + 1)  # close with the updates that were sound
        try:
            self.agg.model(r.stats.round)
        except RoundError:
            r.published.set()  # nothing to publish: the clients get the errors
            self.table.notify()
            return
        self._set_model(r)

    def _set_model(self, r: RoundState) -> None:
        model = self.agg.model(r.stats.round)
        r.model = model.payload
        where = self.agg.slot_of(model.payload)
        if where is not None:
            slot, off = where
            r.model_slot = (slot, off)
            r.model_file = (wire.slot_file_offset(self.pool, slot.index) + off, len(model.payload))
        r.stats.t_published = time.monotonic()
        self.table.set_current(r)
        r.published.set()
