"""The data-plane link's sending side (a mixin of `hearth.agent.link.DataplaneLink`, whose
state it is): stamped sends, the per-step outbox that puts every descriptor posted in one
event-loop iteration for one instance in one ``sendmsg`` (`hold`: one that waits for the next),
sends from callbacks and error replies. Split from the link to keep the send and batch path in
one place, apart from the calls it carries and the reader that answers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hearth.agent.inflight import Pending
from hearth.agent.instance import AGENT_ID
from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import MAX_FRAMES, Descriptor, Kind, Status
from hearth.dataplane.endpoint import unknown_dst_error
from hearth.dataplane.shm import SlotPool
from hearth.runtime.instance import write_slot


def _more_this_step(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether callbacks are queued to run before the loop next polls (asyncio's ready queue;
    True for a loop without one). When none are, nothing else can post in this step, and a
    flush scheduled "for the rest of the step" would only cost a loop pass of its own (one
    of ~7 per warm invocation)."""
    return bool(getattr(loop, "_ready", True))


class Outbox:
    """`send`, `post`, `hold` and the flush; the state is `DataplaneLink`'s."""

    pool: SlotPool
    ep: AsyncEndpoint | None
    pending: dict[bytes, Pending]
    _outbox: dict[int, list[Descriptor]]
    _held: set[int]
    _boxing: dict[int, int]
    _flush_scheduled: bool
    _senders: set[asyncio.Task]
    _loop: asyncio.AbstractEventLoop
    dispatch: Callable[[Descriptor], None]

    async def send(self, d: Descriptor) -> None:
        """Send `d` now; through the outbox when something to its destination waits there
        (a held pool spec, a box of this step) or is still being sent by a task: it never
        overtakes what was posted before it, so a pool instance always reads its spec first
        (its first message is taken as one)."""
        assert self.ep is not None
        if d.dst in self._outbox or d.dst in self._boxing:
            self._post(d.stamp())
            return
        await self.ep.send(d.stamp())

    def post(self, d: Descriptor) -> None:
        """`send` from a plain call: now, or with this loop step's flush (in order with the
        calls posted after it)."""
        self._post(d.stamp())

    def hold(self, d: Descriptor) -> None:
        """`post`, but `d` leaves with the next descriptor to its destination in this loop step
        (or with the step's flush), in one ``sendmsg``: a pool instance's spec and the request
        handed to it wake it once, and the request is there when its import ends (#19)."""
        self._outbox.setdefault(d.dst, []).append(d.stamp())
        self._held.add(d.dst)
        if not self._flush_scheduled:
            self._schedule_flush()

    def send_pair(self, first: Descriptor, then: Descriptor) -> list[Descriptor]:
        """`hold(first)` and `post(then)` to the same destination (a pool instance's spec and
        the request handed to it), sent before the caller books anything: in one ``sendmsg``
        now when nothing to that destination is queued or being sent, else queued behind it
        (the flush sends them, in order). Returns the descriptors the data plane could not
        route now, [] otherwise: the caller books its call, then dispatches their errors
        (`DataplaneLink.start`'s `posted`)."""
        dst = then.dst
        box = [first.stamp(), then.stamp()]
        if dst not in self._outbox and dst not in self._boxing:
            unrouted = self.ep.send_now(box)  # type: ignore[union-attr]
            if unrouted is not None:
                return unrouted
        self._outbox.setdefault(dst, []).extend(box)
        if not self._flush_scheduled:
            self._schedule_flush()
        return []

    def _send_soon(self, send: Any) -> None:
        """Run a send from a callback; the task is kept (and cancelled at `close`)."""
        t = asyncio.create_task(send)
        self._senders.add(t)
        t.add_done_callback(self._senders.discard)

    def _post(self, d: Descriptor) -> None:
        """Queue a descriptor; everything posted in this loop iteration for one instance leaves
        in one ``sendmsg`` (under load, concurrent requests share the system call and the
        instance's wake-up instead of paying one each)."""
        if self._held and d.dst in self._held:  # what waited for this one leaves with it now
            self._held.discard(d.dst)
            box = [*self._outbox.pop(d.dst, ()), d]
            unrouted = None if d.dst in self._boxing else self.ep.send_now(box)  # type: ignore[union-attr]
            if unrouted is None:
                self._outbox[d.dst] = box  # the flush (scheduled by `hold`) sends it
            for u in unrouted or ():
                self.dispatch(unknown_dst_error(u))
            return
        if not self._flush_scheduled and d.dst not in self._boxing:
            # the first of this loop step leaves now (no loop pass of delay on a quiet node);
            # later ones of the same step wait for the flush and share one system call
            assert self.ep is not None
            unrouted = self.ep.send_now([d])
            if unrouted is None:  # not sent now: the flush sends it
                self._schedule_flush()
            else:
                if _more_this_step(self._loop):
                    self._schedule_flush()  # callbacks still to run may post: they batch
                for u in unrouted:
                    self.dispatch(unknown_dst_error(u))
                return
        self._outbox.setdefault(d.dst, []).append(d)
        if not self._flush_scheduled:  # (behind a box a task still sends: the flush queues it)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        boxes, self._outbox = self._outbox, {}
        self._held.clear()
        assert self.ep is not None
        for dst, ds in boxes.items():
            for i in range(0, len(ds), MAX_FRAMES):
                box = ds[i : i + MAX_FRAMES]
                # the usual case: sent at once, no task; behind a box a task still sends, a
                # task too (they take the send lock in order): a later box never goes first
                unrouted = None if dst in self._boxing else self.ep.send_now(box)
                if unrouted is not None:
                    for d in unrouted:
                        self.dispatch(unknown_dst_error(d))
                    continue
                t = asyncio.create_task(self._send_box(box))
                self._senders.add(t)
                self._boxing[dst] = self._boxing.get(dst, 0) + 1
                t.add_done_callback(lambda t, dst=dst: self._boxed(dst, t))

    def _boxed(self, dst: int, t: asyncio.Task) -> None:
        """A box's task is done: `dst` may be sent to at once again when none is left."""
        self._senders.discard(t)
        n = self._boxing.pop(dst, 1) - 1
        if n > 0:
            self._boxing[dst] = n

    async def _send_box(self, ds: list[Descriptor]) -> None:
        assert self.ep is not None
        try:
            unrouted = await self.ep.send_many(ds)
        except Exception as e:  # the data plane is gone: every caller in this box hears it
            for d in ds:
                p = self.pending.get(bytes(d.corr))
                if p is not None and p.future is not None and not p.future.done():
                    p.future.set_exception(e)
            return
        for d in unrouted:  # the destination went away as we sent: as if the proxy said so
            self.dispatch(unknown_dst_error(d))

    async def send_error(self, dst: int, corr: bytes, http_status: int, detail: str = "") -> None:
        slot_args: dict[str, Any] = {}
        if detail:
            slot, mlen, blen = write_slot(self.pool, {"status": http_status, "detail": detail}, b"")
            slot_args = {"slot": slot.index, "gen": slot.gen, "meta_len": mlen, "length": blen}
        await self.send(
            Descriptor(
                dst=dst,
                src=AGENT_ID,
                kind=Kind.ERROR,
                status=Status.HANDLER_ERROR,
                corr=corr,
                aux=http_status,
                **slot_args,
            )
        )
