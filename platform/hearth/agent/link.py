"""The agent's data-plane link: its endpoint, the calls waiting for replies, the outbox and
the reader.

`call(instance, descriptor, timeout)` sends one descriptor and waits for its reply; every
descriptor posted in one event-loop iteration for one instance leaves in one ``sendmsg``.
Descriptors the link does not answer itself go to the callbacks the agent wires: a reply
finished work on an instance (`on_done`), an instance reported (`on_report`: ready, pooled or
failed), an instance made a chained call (`on_invoke`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from hearth.agent.deadlines import AfterTimer, Deadlines
from hearth.agent.inflight import InflightBooks, Pending
from hearth.agent.instance import AGENT_ID, Instance, InstanceDied
from hearth.agent.spin import ReplySpin, install, uninstall
from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import MAX_FRAMES, PROXY_ID, Descriptor, Flags, Kind, Status
from hearth.dataplane.endpoint import unknown_dst_error
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import SHUTDOWN, write_slot

log = logging.getLogger("hearth.node")


def _nothing(*_: Any) -> None:
    return None


class _Then:
    """A started call's end, for `DataplaneLink.start`: takes the place of `call`'s future (the
    link, its deadlines and an instance's exit end it the same way) and hands the reply, or why
    there is none, to a callback instead of a waiting coroutine."""

    __slots__ = ("link", "key", "inst", "then", "ended", "live", "sent")

    def __init__(
        self,
        link: DataplaneLink,
        key: bytes,
        inst: Instance,
        then: Callable[[Descriptor | BaseException], None],
        sent: Descriptor,
    ) -> None:
        self.link, self.key, self.inst, self.then, self.sent = link, key, inst, then, sent
        self.ended = False
        self.live = False  # `start` has returned: `then` may run at once

    def done(self) -> bool:
        return self.ended

    def cancelled(self) -> bool:
        return False

    def set_result(self, d: Descriptor) -> None:
        self._end(d)

    def set_exception(self, e: BaseException) -> None:
        self._end(e)

    def _end(self, got: Descriptor | BaseException) -> None:
        if self.ended:
            return
        self.ended = True
        self.link.pending.pop(self.key, None)
        self.inst.pending.discard(self.key)
        self.link.requests.pop((self.sent.slot, self.sent.gen), None)  # read in this same step
        if isinstance(got, BaseException) and not isinstance(got, InvokeError):
            # no reply (its deadline, the data plane failed): the instance may still be at
            # work in the request slot, which is freed on the late reply or at its exit
            self.link.abandon(self.inst, self.key, self.sent)
        if not self.live:  # ended inside `start` (not routable): its caller hears it later
            self.link._loop.call_soon(self.then, got)
            return
        try:
            self.then(got)
        except Exception:  # the link goes on; the caller's callback must not raise
            log.exception("a call's end callback failed")


def _replied(fut: asyncio.Future) -> bool:
    """Whether `call`'s future holds its reply."""
    return fut.done() and not fut.cancelled() and fut.exception() is None


def _more_this_step(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether callbacks are queued to run before the loop next polls (asyncio's ready queue;
    True for a loop without one). When none are, nothing else can post in this step, and a
    flush scheduled "for the rest of the step" would only cost a loop pass of its own (one
    of ~7 per warm invocation)."""
    return bool(getattr(loop, "_ready", True))


class DataplaneLink(InflightBooks):
    def __init__(self, pool: SlotPool, proxy_socket: str) -> None:
        self.pool = pool
        self.proxy_socket = proxy_socket
        self.ep: AsyncEndpoint | None = None
        self.mode = "unknown"
        self.pending: dict[bytes, Pending] = {}
        # The request slots (slot, gen) the agent sent to instances and that may still be in
        # use there, each with its call's correlation id: the agent owns them (an instance
        # does not adopt them), so an owner check cannot tell them from a reply to drop. A
        # reply naming one is read or freed only as that call's own reply (`dispatch`).
        self.requests: dict[tuple[int, int], bytes] = {}
        # calls settled otherwise than by a reply in their request slot (key -> (endpoint,
        # its process (pid, start time), until, the slot it was answered in)): a reply of theirs read later still has
        # its slot freed when that instance handed it over (`_settled`, `_handed`)
        self.settled: dict[
            bytes, tuple[int, tuple[int, int] | None, float, tuple[int, int] | None]
        ] = {}
        self.ended: dict[int, tuple[tuple[int, int] | None, float]] = {}
        self.instance_of: Callable[[int], Instance | None] = _nothing
        # descriptors posted during one event-loop iteration, by destination: flushed together
        self._outbox: dict[int, list[Descriptor]] = {}
        self._held: set[int] = set()  # destinations whose outbox waits for one more (`hold`)
        self._flush_scheduled = False
        self._senders: set[asyncio.Task] = set()
        self.on_done: Callable[[Instance], None] = _nothing
        self.on_report: Callable[[int, dict[str, Any]], None] = _nothing
        self.on_invoke: Callable[[Descriptor], Any] = _nothing
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by open()
        self._deadlines: Deadlines | None = None  # set by open()
        self.spin: ReplySpin | None = None  # set by the agent: busy-polls for lone replies

    async def open(self) -> None:
        self.ep = await AsyncEndpoint.register(self.proxy_socket, AGENT_ID)
        self._loop = asyncio.get_running_loop()  # asked per call otherwise (a getpid() each)
        self._deadlines = Deadlines(self._loop)
        self.mode = getattr(self.ep, "mode", "unknown")
        # replies are dispatched from the loop's reader callback: no reader task
        self.ep.read_into(self._received)
        if self.spin is not None and not install(self._loop, self.spin):
            self.spin = None  # not a selector loop: nothing to spin in

    def _sent(self, inst: Instance, key: bytes) -> None:
        if self.spin is not None:  # a call left: busy-poll for its reply?
            self.spin.sent(key, inst.function or "", len(self.pending))

    async def close(self) -> None:
        tasks = list(self._senders)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.spin is not None and self._loop is not None:
            uninstall(self._loop, self.spin)
        if self._deadlines is not None:
            self._deadlines.close()
        if self.ep:
            await self.ep.close() if asyncio.iscoroutinefunction(self.ep.close) else self.ep.close()

    # -- sending -----------------------------------------------------------------------------
    async def send(self, d: Descriptor) -> None:
        assert self.ep is not None
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

    async def shutdown(self, inst: Instance) -> None:
        """Ask an instance to finish its work and exit."""
        await self.send(Descriptor(dst=inst.eid, src=AGENT_ID, kind=Kind.CANCEL, flags=SHUTDOWN))

    async def call(
        self,
        inst: Instance,
        d: Descriptor,
        timeout: float,
        after: asyncio.Future | None = None,
        on_reply: Callable[[Descriptor], None] | None = None,
    ) -> Descriptor:
        """Send `d` to `inst`, wait for its reply; TimeoutError after `timeout` seconds. With
        `after` (a starting instance's `ready`: the request went ahead of its report), the
        `timeout` runs from when `after` resolves; the start itself is bounded by the
        lifecycle, which kills an instance that does not report in time. ``on_reply`` sees
        the reply descriptor in the reader callback, before the caller resumes (it must not
        keep the slot: the caller frees it)."""
        loop = self._loop
        fut = loop.create_future()
        key = bytes(d.corr)
        self.pending[key] = Pending(inst=inst, future=fut, on_reply=on_reply, sent=d)
        inst.pending.add(key)
        req = (d.slot, d.gen)
        if d.has_slot:
            self.requests[req] = key
        # The deadline goes on the link's one timer (hearth.agent.deadlines): no timer, task or
        # wait_for of its own per call.
        timer = None
        if after is None or after.done():
            assert self._deadlines is not None
            self._deadlines.add(loop.time() + max(0.001, timeout), fut)
        else:
            timer = AfterTimer(loop, max(0.001, timeout), fut, after)
        given_up = False
        try:
            self._post(d.stamp())
            if timer is None:  # (sent ahead of a start: its round trip is not a warm call's)
                self._sent(inst, key)
            return await fut
        except BaseException as e:
            # timed out, cancelled (a client gone, a consumer stopping) or the data plane
            # failed: the link settles the call (an InvokeError is the caller's to settle)
            given_up = not isinstance(e, InvokeError)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            # gone from `pending` with no result: its reply came after `fut` ended and before
            # this resumed (a cancel or a timeout in the same loop pass), and `dispatch` freed
            # what it held: nothing is left in flight to put back
            gone = self.pending.pop(key, None) is None
            inst.pending.discard(key)
            self.requests.pop(req, None)  # the caller reads the reply in this same step
            if given_up and not (gone and not _replied(fut)):
                self._gave_up(inst, key, d, fut)

    def _gave_up(self, inst: Instance, key: bytes, d: Descriptor, fut: asyncio.Future) -> None:
        """`call` ended with no reply for its caller to read (timed out, cancelled, the data
        plane failed): the link settles what it holds. A request that may still be at work in
        the instance is abandoned (its slot freed on the reply or at
        the instance's exit, never while it may still write)."""
        failed = fut.exception() if fut.done() and not fut.cancelled() else None
        if isinstance(failed, InvokeError):  # the instance died or was never reached
            self.pool.release_if_owner(d.slot, d.gen)
        elif failed is not None or not fut.done() or fut.cancelled():
            self.abandon(inst, key, d)
        else:  # its reply came just before the cancel: drop it
            got: Descriptor = fut.result()
            if got.has_slot:
                self.free(got.slot, got.gen)
            if (got.slot, got.gen) != (d.slot, d.gen):
                self.pool.release_if_owner(d.slot, d.gen)

    def start(
        self,
        inst: Instance,
        d: Descriptor,
        timeout: float,
        on_reply: Callable[[Descriptor], None] | None,
        then: Callable[[Descriptor | BaseException], None],
    ) -> None:
        """`call` without a coroutine: send `d` to `inst` (a ready instance: nothing to wait
        for); `then(reply)` runs in the reader callback when the reply comes, or
        `then(TimeoutError())` after `timeout` seconds, or `then(InstanceDied(...))` when the
        instance ends first. It runs exactly once and never before this returns. ``on_reply``
        as in `call`."""
        key = bytes(d.corr)
        end = _Then(self, key, inst, then, d)
        self.pending[key] = Pending(inst=inst, future=end, on_reply=on_reply, sent=d)  # type: ignore[arg-type]
        inst.pending.add(key)
        if d.has_slot:
            self.requests[(d.slot, d.gen)] = key
        assert self._deadlines is not None
        self._deadlines.add(self._loop.time() + max(0.001, timeout), end)  # type: ignore[arg-type]
        self._post(d.stamp())
        self._sent(inst, key)
        end.live = True

    async def forward(
        self,
        inst: Instance,
        d: Descriptor,
        timeout: float = 0.0,
        on_timeout: Callable[[Instance, str], None] = _nothing,
    ) -> None:
        """A chained call: the same slot goes on to `inst`; its reply goes back to `d.src`.

        The agent picks the correlation id of the forwarded call (random), so an instance
        cannot choose one that collides with another caller's pending call; after `timeout`
        the caller gets a 504 and the callee is handed to `on_timeout` (killed: it may hang)."""
        key = os.urandom(16)
        out = d.replace(dst=inst.eid, src=AGENT_ID, corr=key)
        p = Pending(inst=inst, reply_to=d.src, reply_corr=bytes(d.corr), sent=out)
        if d.flags & Flags.BORROWED and (d.slot, d.gen) in self.requests:
            # the caller lends its own request slot: one more reference, dropped when this
            # call is over, so the slot outlives the caller's call (its timeout, its exit)
            # while the callee may still read it
            self.pool.incref(d.slot, d.gen)
            p.lent = (d.slot, d.gen)
        self.pending[key] = p
        inst.pending.add(key)
        if timeout > 0:
            p.timer = asyncio.get_running_loop().call_later(
                timeout, self._chain_expired, key, on_timeout
            )
        await self.send(out)

    def _chain_expired(self, key: bytes, on_timeout: Callable[[Instance, str], None]) -> None:
        p = self.pending.get(key)
        if p is None or p.reply_to is None:
            return
        # left as an abandoned call until the callee's late reply (its slot freed) or its exit:
        # a reply nobody registered is never freed (`dispatch`); its slot, the caller's, is not
        # this entry's to free (sent=None)
        self.pending[key] = Pending(inst=p.inst, lent=p.lent)
        on_timeout(p.inst, "chained call timed out")
        self._send_soon(self.send_error(p.reply_to, p.reply_corr, 504, "chained call timed out"))

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
            unrouted = self.ep.send_now(box)  # type: ignore[union-attr]
            if unrouted is None:
                self._outbox[d.dst] = box  # the flush (scheduled by `hold`) sends it
            for u in unrouted or ():
                self.dispatch(unknown_dst_error(u))
            return
        if not self._flush_scheduled:
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

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        boxes, self._outbox = self._outbox, {}
        self._held.clear()
        assert self.ep is not None
        for ds in boxes.values():
            for i in range(0, len(ds), MAX_FRAMES):
                box = ds[i : i + MAX_FRAMES]
                unrouted = self.ep.send_now(box)  # the usual case: sent at once, no task
                if unrouted is not None:
                    for d in unrouted:
                        self.dispatch(unknown_dst_error(d))
                    continue
                t = asyncio.create_task(self._send_box(box))
                self._senders.add(t)
                t.add_done_callback(self._senders.discard)

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

    # -- receiving ---------------------------------------------------------------------------
    def _received(self, d: Descriptor) -> None:
        try:
            self.dispatch(d)
        except Exception:
            log.exception("bad descriptor from %s", d.src)

    def dispatch(self, d: Descriptor) -> None:
        key = bytes(d.corr)
        if d.kind in (Kind.REPLY, Kind.ERROR):
            p = self.pending.get(key)
            req = (d.slot, d.gen)
            if p is None:
                # nobody waits for it. Its slot is freed only when it is surely this reply's
                # own: the proxy bouncing what the agent sent, the last reply of an instance
                # whose exit was handled first, or a slot its sender's process handed over and
                # the agent has not taken as an answer (a faulty instance's second reply to a
                # call already answered in its request slot). Any other (any instance can name
                # any slot) may name one the agent is using: a request in flight, a reply
                # handed over by another instance and not read yet, a body being streamed in:
                # neither read nor freed
                was = self.settled.get(key)
                if (
                    d.has_slot
                    and req not in self.requests
                    and (
                        (d.src == PROXY_ID and self._handed(req, None))
                        or (
                            was is not None
                            and was[0] == d.src
                            and req != was[3]
                            and self._handed(req, was[1])
                        )
                        or (
                            d.src != PROXY_ID
                            and (sender := self.sender(d.src)) is not None
                            and self._handed(req, sender)
                        )
                    )
                ):
                    self.free(d.slot, d.gen)
                elif d.has_slot:
                    log.warning("dropped a stray reply from endpoint %s", d.src)
                return
            if d.src not in (p.inst.eid, PROXY_ID):
                # only the instance the call went to answers it (`src` is stamped by the proxy)
                log.warning("dropped a reply for %s from endpoint %s", p.inst.id, d.src)
                return
            del self.pending[key]
            if self.spin is not None:
                self.spin.replied(key)
            if p.timer is not None:
                p.timer.cancel()
            if p.lent is not None:  # (a chained call that borrowed its caller's request slot)
                self._unlend(p)
            waited = p.future is not None and not p.future.done()
            lost = d.kind == Kind.ERROR and d.status == Status.UNKNOWN_DST
            mine = p.sent is not None and req == (p.sent.slot, p.sent.gen)
            if not mine and d.src != PROXY_ID:  # (not the warm call's reply in its request slot)
                # a faulty instance's second answer is freed too (not this one's slot)
                self._settled([key], p.inst, req if d.has_slot else None)
            if (
                d.has_slot
                and not mine
                and (
                    self.requests.get(req, key) != key
                    or (d.src != PROXY_ID and not self._handed(req, p.inst.ident))
                )
            ):
                # a reply neither in its request slot nor in a slot its instance handed over
                # (another call's request slot, a reply handed over by another instance, a
                # body being streamed in): never read nor freed here; this call answers 502
                log.warning("%s replied in a slot not its own (%d)", p.inst.id, d.slot)
                self.on_done(p.inst)
                p.inst.pending.discard(key)
                if waited:
                    p.future.set_exception(
                        InvokeError(502, "bad_reply", "the instance replied in a slot not its own")
                    )
                elif p.reply_to is not None:
                    self._send_soon(self.send_error(p.reply_to, p.reply_corr, 502, "bad reply"))
                elif p.sent is not None and p.sent.has_slot:  # abandoned: its slot is done
                    self.requests.pop((p.sent.slot, p.sent.gen), None)
                    self.pool.release_if_owner(p.sent.slot, p.sent.gen)
                return
            if d.has_slot and not mine and d.src != PROXY_ID:
                # taken as this call's answer: no later stray of its instance may claim it
                self.pool.taken(*req)
            if waited and not lost and p.on_reply is not None:
                # first, before any bookkeeping: a forwarded call's reply leaves from here
                try:
                    p.on_reply(d)
                except Exception:  # the caller still gets the reply the usual way
                    log.exception("reply hook for %s failed", p.inst.id)
            self.on_done(p.inst)
            if waited:
                if lost:
                    p.future.set_exception(
                        InstanceDied(
                            p.inst.function or "?",
                            p.inst.id,
                            f"instance {p.inst.id} is not registered with the proxy",
                        )
                    )
                else:
                    p.future.set_result(d)
            elif p.reply_to is not None:
                p.inst.pending.discard(key)
                fwd = d.replace(dst=p.reply_to, src=AGENT_ID, corr=p.reply_corr)
                asyncio.create_task(self.send(fwd))  # same slot, onwards
            else:  # abandoned by its caller
                p.inst.pending.discard(key)
                if d.has_slot:  # its request slot, or a slot it handed over (refused above)
                    self.free(d.slot, d.gen)
                if p.sent is not None and p.sent.has_slot:
                    self.requests.pop((p.sent.slot, p.sent.gen), None)
                    if not mine:  # answered elsewhere: the request slot is done with too
                        self.pool.release_if_owner(p.sent.slot, p.sent.gen)
        elif d.kind == Kind.PONG and d.has_slot:
            # a report is written in a slot of the instance's own: one that is the agent's
            # (a request in flight, a reply handed over, a body) is neither read nor freed
            if (d.slot, d.gen) in self.requests or self.pool.creators(d.slot, d.gen):
                log.warning("dropped a report from endpoint %s naming the agent's slot", d.src)
                return
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            self.free(d.slot, d.gen)
            self.on_report(d.src, meta)
        elif d.kind == Kind.INVOKE:
            asyncio.create_task(self.on_invoke(d))
