"""The data-plane link's receiving side (a mixin of `hearth.agent.link.DataplaneLink`, whose
state it is): every descriptor read from the agent's endpoint is dispatched here, in the
loop's reader callback. A reply settles its pending call, or, when nobody waits for it (a
stray or late reply), is freed only when its slot is surely its own; an instance's report goes
to `on_report`, a chained call to `on_invoke`. Split from the link so that its slot ownership
checks (what a reply may read or free: docs/security.md) read in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hearth.agent.inflight import Pending
from hearth.agent.instance import AGENT_ID, Instance, InstanceDied
from hearth.agent.spin import ReplySpin
from hearth.dataplane.descriptor import PROXY_ID, Descriptor, Kind, Status
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError
from hearth.runtime.codec import unpack_meta

log = logging.getLogger("hearth.node")


class Reader:
    """`dispatch` of what the endpoint reads; the state is `DataplaneLink`'s."""

    pool: SlotPool
    pending: dict[bytes, Pending]
    requests: dict[tuple[int, int], bytes]
    settled: dict[bytes, tuple[int, tuple[int, int] | None, float, tuple[int, int] | None]]
    spin: ReplySpin | None
    on_done: Callable[[Instance], None]
    on_report: Callable[[int, dict[str, Any]], None]
    instance_of: Callable[[int], Instance | None]
    on_invoke: Callable[[Descriptor], Any]
    send: Callable[[Descriptor], Awaitable[None]]
    send_error: Callable[[int, bytes, int, str], Awaitable[None]]
    _send_soon: Callable[[Any], None]

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
            # (a request in flight, a reply handed over, a body) is neither read nor freed,
            # but for the spec slot that very instance was sent (`Flags.SPEC_REPORT`): a pool
            # instance may report in it once read (no slot of its own to take, #19); the
            # agent frees it as it would have (`spec_read`, or at the instance's exit)
            inst = self.instance_of(d.src)
            own = inst is not None and inst.spec_slot == (d.slot, d.gen)
            if (d.slot, d.gen) in self.requests or (not own and self.pool.creators(d.slot, d.gen)):
                log.warning("dropped a report from endpoint %s naming the agent's slot", d.src)
                return
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            if not own:
                self.free(d.slot, d.gen)
            self.on_report(d.src, meta)
        elif d.kind == Kind.INVOKE:
            asyncio.create_task(self.on_invoke(d))
