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
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hearth.agent.instance import AGENT_ID, Instance, InstanceDied
from hearth.dataplane.descriptor import MAX_FRAMES, Descriptor, Kind, Status
from hearth.dataplane.endpoint import AsyncEndpoint, unknown_dst_error
from hearth.dataplane.shm import SlotPool, StaleSlot
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import SHUTDOWN, write_slot

log = logging.getLogger("hearth.node")


@dataclass
class Pending:
    inst: Instance
    future: asyncio.Future | None = None
    reply_to: int | None = None  # a chained call: forward the reply to this endpoint
    started: float = field(default=0.0)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _nothing(*_: Any) -> None:
    return None


class DataplaneLink:
    def __init__(self, pool: SlotPool, proxy_socket: str) -> None:
        self.pool = pool
        self.proxy_socket = proxy_socket
        self.ep: AsyncEndpoint | None = None
        self.mode = "unknown"
        self.pending: dict[bytes, Pending] = {}
        # descriptors posted during one event-loop iteration, by destination: flushed together
        self._outbox: dict[int, list[Descriptor]] = {}
        self._flush_scheduled = False
        self._senders: set[asyncio.Task] = set()
        self._reader_task: asyncio.Task | None = None
        self.on_done: Callable[[Instance], None] = _nothing
        self.on_report: Callable[[int, dict[str, Any]], None] = _nothing
        self.on_invoke: Callable[[Descriptor], Any] = _nothing

    async def open(self) -> None:
        self.ep = await AsyncEndpoint.register(self.proxy_socket, AGENT_ID)
        self.mode = getattr(self.ep, "mode", "unknown")
        self._reader_task = asyncio.create_task(self._reader(), name="agent-reader")

    async def close(self) -> None:
        tasks = [t for t in (self._reader_task, *self._senders) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.ep:
            await self.ep.close() if asyncio.iscoroutinefunction(self.ep.close) else self.ep.close()

    # -- sending -----------------------------------------------------------------------------
    async def send(self, d: Descriptor) -> None:
        assert self.ep is not None
        await self.ep.send(d.stamp())

    async def shutdown(self, inst: Instance) -> None:
        """Ask an instance to finish its work and exit."""
        await self.send(Descriptor(dst=inst.eid, src=AGENT_ID, kind=Kind.CANCEL, flags=SHUTDOWN))

    async def call(self, inst: Instance, d: Descriptor, timeout: float) -> Descriptor:
        """Send `d` to `inst`, wait for its reply; TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        key = bytes(d.corr)
        self.pending[key] = Pending(inst=inst, future=fut)
        inst.pending.add(key)
        # A timer on the future is much cheaper than asyncio.wait_for (no extra task per call).
        timer = loop.call_later(max(0.001, timeout), _expire, fut)
        try:
            self._post(d.stamp())
            return await fut
        finally:
            timer.cancel()
            self.pending.pop(key, None)
            inst.pending.discard(key)

    async def forward(self, inst: Instance, d: Descriptor) -> None:
        """A chained call: the same slot goes on to `inst`; its reply goes back to `d.src`."""
        key = bytes(d.corr)
        self.pending[key] = Pending(inst=inst, reply_to=d.src)
        inst.pending.add(key)
        await self.send(dataclasses.replace(d, dst=inst.eid, src=AGENT_ID))

    def _post(self, d: Descriptor) -> None:
        """Queue a descriptor; everything posted in this loop iteration for one instance leaves
        in one ``sendmsg`` (under load, concurrent requests share the system call and the
        instance's wake-up instead of paying one each)."""
        self._outbox.setdefault(d.dst, []).append(d)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        boxes, self._outbox = self._outbox, {}
        for ds in boxes.values():
            for i in range(0, len(ds), MAX_FRAMES):
                t = asyncio.create_task(self._send_box(ds[i : i + MAX_FRAMES]))
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

    async def fail_pending(self, inst: Instance, rc: int) -> None:
        """`inst` has ended: every call waiting on it fails now (502), chained callers too."""
        for key in list(inst.pending):
            p = self.pending.get(key)
            if p and p.future and not p.future.done():
                p.future.set_exception(
                    InstanceDied(
                        inst.function or "?",
                        inst.id,
                        f"instance {inst.id} of {inst.function!r} died (exit code {rc}) during the invocation",
                    )
                )
            elif p and p.reply_to is not None:
                self.pending.pop(key, None)
                await self.send_error(p.reply_to, key, 502)

    def free(self, slot: int, gen: int) -> None:
        try:
            self.pool.release(slot, gen)
        except StaleSlot:
            pass

    # -- receiving ---------------------------------------------------------------------------
    async def _reader(self) -> None:
        assert self.ep is not None
        while True:
            try:
                d = await self.ep.recv()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("agent data-plane endpoint failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            try:
                self.dispatch(d)
            except Exception:
                log.exception("bad descriptor from %s", d.src)

    def dispatch(self, d: Descriptor) -> None:
        key = bytes(d.corr)
        if d.kind in (Kind.REPLY, Kind.ERROR):
            p = self.pending.pop(key, None)
            if p is None:
                if d.has_slot:  # the caller gave up (timeout): drop the reply
                    self.free(d.slot, d.gen)
                return
            self.on_done(p.inst)
            if p.future is not None and not p.future.done():
                if d.kind == Kind.ERROR and d.status == Status.UNKNOWN_DST:
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
                fwd = dataclasses.replace(d, dst=p.reply_to, src=AGENT_ID)  # same slot, onwards
                asyncio.create_task(self.send(fwd))
        elif d.kind == Kind.PONG and d.has_slot:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            self.free(d.slot, d.gen)
            self.on_report(d.src, meta)
        elif d.kind == Kind.INVOKE:
            asyncio.create_task(self.on_invoke(d))
