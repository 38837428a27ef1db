"""The agent's data-plane link: its endpoint and the calls waiting for replies. Its mixins hold
the rest of its parts (the state is this class's): the outbox (`agent.outbox`), the reader
(`agent.reader`) and the books of calls in flight (`agent.inflight`).

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

from hearth.agent.deadlines import AfterTimer, Bound, Deadlines
from hearth.agent.inflight import InflightBooks, Pending
from hearth.agent.instance import AGENT_ID, Instance
from hearth.agent.outbox import Outbox
from hearth.agent.reader import Reader
from hearth.agent.spin import ReplySpin, install, uninstall
from hearth.dataplane.async_endpoint import AsyncEndpoint
from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.endpoint import unknown_dst_error
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError
from hearth.runtime.instance import SHUTDOWN

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
        inst, then = self.inst, self.then
        # the link's deadline heap keeps this until its deadline is due or compacted (the
        # call's timeout, 30 s by default): nothing of the call is held from here (its
        # instance, and through `then` the caller's books)
        self.inst = self.then = None  # type: ignore[assignment]
        self.link.pending.pop(self.key, None)
        inst.pending.discard(self.key)
        self.link.requests.pop((self.sent.slot, self.sent.gen), None)  # read in this same step
        if isinstance(got, BaseException) and not isinstance(got, InvokeError):
            # no reply (its deadline, the data plane failed): the instance may still be at
            # work in the request slot, which is freed on the late reply or at its exit
            self.link.abandon(inst, self.key, self.sent)
        if not self.live:  # ended inside `start` (not routable): its caller hears it later
            self.link._loop.call_soon(then, got)
            return
        try:
            then(got)
        except Exception:  # the link goes on; the caller's callback must not raise
            log.exception("a call's end callback failed")


def _replied(fut: asyncio.Future) -> bool:
    """Whether `call`'s future holds its reply."""
    return fut.done() and not fut.cancelled() and fut.exception() is None


class DataplaneLink(Reader, Outbox, InflightBooks):
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
        self._boxing: dict[int, int] = {}  # destination -> boxes a task still sends (`_flush`)
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
        timer: AfterTimer | None = None
        bound: Bound | None = None
        if after is None or after.done():
            assert self._deadlines is not None
            bound = Bound(fut)
            self._deadlines.add(loop.time() + max(0.001, timeout), bound)
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
            if bound is not None:
                bound.end()
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
        after: asyncio.Future | None = None,
        posted: list[Descriptor] | None = None,
    ) -> None:
        """`call` without a coroutine: send `d` to `inst`; `then(reply)` runs in the reader
        callback when the reply comes, or `then(TimeoutError())` after `timeout` seconds, or
        `then(InstanceDied(...))` when the instance ends first. It runs exactly once and never
        before this returns. ``on_reply`` and `after` (a starting instance's `ready`: the
        `timeout` runs from when it resolves) as in `call`. `posted`: `d` was sent already in
        this step (`send_pair`); these descriptors of it could not be routed."""
        key = bytes(d.corr)
        end = _Then(self, key, inst, then, d)
        self.pending[key] = Pending(inst=inst, future=end, on_reply=on_reply, sent=d)  # type: ignore[arg-type]
        inst.pending.add(key)
        if d.has_slot:
            self.requests[(d.slot, d.gen)] = key
        deadlines, loop = self._deadlines, self._loop
        assert deadlines is not None
        ahead = after is not None and not after.done()
        if not ahead:
            deadlines.add(loop.time() + max(0.001, timeout), end)  # type: ignore[arg-type]
        else:  # sent ahead of a start: its time runs from the ready report (or its failure)

            def arm(_: asyncio.Future) -> None:
                if not end.ended:
                    deadlines.add(loop.time() + max(0.001, timeout), end)  # type: ignore[arg-type]

            after.add_done_callback(arm)  # type: ignore[union-attr]
        if posted is None:
            self._post(d.stamp())
        else:
            for u in posted:
                self.dispatch(unknown_dst_error(u))
        if not ahead:  # (sent ahead of a start: its round trip is not a warm call's)
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
