"""The data-plane link's books of the calls in flight: which calls wait for a reply
(`Pending`), which request slots the agent sent out and may still be in use (`requests`), and
the calls settled otherwise than by a reply in their request slot, remembered a while
(`settled`). `InflightBooks` (a mixin of `hearth.agent.link.DataplaneLink`, whose state it
is) decides what a stray reply, a chained call or an instance's exit may read or free: only
what the link registered, or what the same instance handed over (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hearth.agent.instance import Instance, InstanceDied
from hearth.dataplane.descriptor import Descriptor, Flags
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import StaleSlot

log = logging.getLogger("hearth.node")

#: how long a call settled otherwise than by its instance's reply in the request slot (the
#: instance ended, answered elsewhere, or was refused) is remembered for a reply still on its
#: way, and how many such calls at most
SETTLED_GRACE_S = 30.0
SETTLED_MAX = 1 << 16


@dataclass
class Pending:
    inst: Instance
    future: asyncio.Future | None = None
    reply_to: int | None = None  # a chained call: forward the reply to this endpoint
    started: float = field(default=0.0)
    reply_corr: bytes = b""  # a chained call: the caller's own correlation id
    sent: Descriptor | None = None  # a chained call: what went to `inst` (its slot, its flags)
    timer: asyncio.TimerHandle | None = None
    # sees the reply first, in the reader callback (a forwarded call sends it on from there)
    on_reply: Callable[[Descriptor], None] | None = None
    lent: tuple[int, int] | None = None  # a chained call: its caller's request slot, held


class InflightBooks:
    """The books' decisions and their slot frees; the state is `DataplaneLink`'s."""

    pool: SlotPool
    pending: dict[bytes, Pending]
    requests: dict[tuple[int, int], bytes]
    settled: dict[bytes, tuple[int, tuple[int, int] | None, float, tuple[int, int] | None]]
    # endpoint -> (its process, until): instances that ended, remembered SETTLED_GRACE_S for
    # their replies still on the way (`sender`)
    ended: dict[int, tuple[tuple[int, int] | None, float]]
    # the instance of a live endpoint (the agent wires its table's lookup)
    instance_of: Callable[[int], Instance | None]
    _loop: asyncio.AbstractEventLoop
    send_error: Callable[[int, bytes, int, str], Awaitable[None]]

    def abandon(self, inst: Instance, key: bytes, sent: Descriptor | None = None) -> None:
        """The caller stopped waiting for `key`: its reply, when it comes, only frees its slot
        and marks the instance's work done. If the instance ends first, the request slot it
        was `sent` is freed when it is still the agent's (the instance never adopted it); an
        instance that has already ended has it freed now."""
        if inst.running:
            self.pending[key] = Pending(inst=inst, sent=sent)
            inst.pending.add(key)
            if sent is not None and sent.has_slot:
                self.requests[(sent.slot, sent.gen)] = key  # still in use there
        elif sent is not None:
            self.requests.pop((sent.slot, sent.gen), None)
            self.pool.release_if_owner(sent.slot, sent.gen)

    async def fail_pending(self, inst: Instance, rc: int) -> None:
        """`inst` has ended: every call waiting on it fails now (502), chained callers too.
        A reply it sent before it ended, read only now, still has its slot freed."""
        keys = list(inst.pending)
        self._settled(keys, inst)
        self._ended(inst)
        for key in keys:
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
                if p.timer is not None:
                    p.timer.cancel()
                self._unlend(p)
                self._free_unadopted(p)
                await self.send_error(p.reply_to, p.reply_corr, 502, "the called instance died")
            elif p and p.future is None:  # abandoned by its caller (`abandon`): no reply now
                self.pending.pop(key, None)
                inst.pending.discard(key)
                if p.timer is not None:
                    p.timer.cancel()
                self._unlend(p)
                if p.sent is not None and p.sent.has_slot:
                    self.requests.pop((p.sent.slot, p.sent.gen), None)
                    self.pool.release_if_owner(p.sent.slot, p.sent.gen)

    def _settled(
        self, keys: list[bytes], inst: Instance, answered: tuple[int, int] | None = None
    ) -> None:
        """Calls settled otherwise than by their instance's reply in the request slot: for
        SETTLED_GRACE_S, a reply from that endpoint with that key (the last one of an
        instance that ended, a faulty one's second answer) is known as theirs and its slot
        freed (`dispatch`) if that instance handed it over (`_handed`) and it is not the slot
        the call was `answered` in (its caller may still be reading it). Bounded; the oldest
        go first (insertion order is expiry order)."""
        settled, now = self.settled, self._loop.time()
        for key in keys:
            settled[key] = (inst.eid, inst.ident, now + SETTLED_GRACE_S, answered)
        while settled:
            first = next(iter(settled))
            if settled[first][2] > now and len(settled) <= SETTLED_MAX:
                break
            del settled[first]

    def _ended(self, inst: Instance) -> None:
        """`inst` has ended: for SETTLED_GRACE_S its endpoint still names its process
        (`sender`), for its replies read only now. Bounded as `settled` is."""
        ended, now = self.ended, self._loop.time()
        ended.pop(inst.eid, None)  # (re-inserted last: insertion order is expiry order)
        ended[inst.eid] = (inst.ident, now + SETTLED_GRACE_S)
        while ended:
            first = next(iter(ended))
            if ended[first][1] > now and len(ended) <= SETTLED_MAX:
                break
            del ended[first]

    def sender(self, eid: int) -> tuple[int, int] | None:
        """The process (pid, start time) of the instance of endpoint `eid`, live or ended a
        moment ago; None when unknown or in another pid namespace (a joined pod)."""
        inst = self.instance_of(eid)
        if inst is not None:
            return inst.ident
        was = self.ended.get(eid)
        return was[0] if was is not None and was[1] > self._loop.time() else None

    def lendable(self, d: Descriptor, ident: tuple[int, int] | None) -> bool:
        """Whether an instance's chained call (`d`, an INVOKE from the instance of process
        `ident`, its pid and start time) may have the slot it names read and sent on: a slot
        that process owns (pid *and* start: a joined pod's process can have its pid), or the
        request slot of a call in flight on that very instance, lent (BORROWED:
        `ctx.invoke(g, event.payload)`). Never another call's request slot, a reply handed to
        the agent, a body being streamed in, or another instance's slot. An instance in
        another pid namespace (`ident` None: a joined one) is held to "not the agent's" only.
        StaleSlot if the slot was freed."""
        key = self.requests.get((d.slot, d.gen))
        if key is not None:
            p = self.pending.get(key)
            return bool(d.flags & Flags.BORROWED) and p is not None and p.inst.eid == d.src
        if ident is None:
            return not self.pool.creators(d.slot, d.gen)
        owner = self.pool.owner(d.slot, d.gen)
        if owner is None:
            raise StaleSlot(f"slot {d.slot} generation {d.gen} is stale")
        return owner == ident

    def _handed(self, slot: tuple[int, int], ident: tuple[int, int] | None) -> bool:
        """Whether the instance of process `ident` (pid, start time) handed this slot to the
        agent (its reply, in a slot of its own: `SlotPool.give_to_creator`) and the agent still
        owns it. An instance in another pid namespace (`ident` None) cannot be told apart: any
        slot the agent owns counts."""
        try:
            if ident is None:
                return self.pool.creators(*slot)
            return self.pool.handed_by(*slot) == ident
        except StaleSlot:
            return False

    def _unlend(self, p: Pending) -> None:
        """A chained call is over: its hold on the caller's lent request slot is dropped."""
        if p.lent is not None:
            self.free(*p.lent)
            p.lent = None

    def _free_unadopted(self, p: Pending) -> None:
        """The callee died: a slot it was sent but never adopted is still its caller's, and
        nobody else will free it (a lent, BORROWED slot stays with its owner)."""
        d = p.sent
        if d is None or not d.has_slot or d.flags & Flags.BORROWED:
            return
        owner = self.pool.owner(d.slot, d.gen)
        if owner is not None and owner != p.inst.ident:
            self.free(d.slot, d.gen)

    def free(self, slot: int, gen: int) -> None:
        try:
            self.pool.release(slot, gen)
        except StaleSlot:
            pass
