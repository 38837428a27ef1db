"""The instance's side of the wire: descriptors out (replies queued on the reader thread and
sent together), reports to the agent, and the shared-memory slots they point to.

Part of :class:`hearth.runtime.instance.Instance` (a mixin: the state is the instance's).
"""

from __future__ import annotations

import os
import struct
import threading
import time

from hearth.dataplane.descriptor import FORMAT, NO_SLOT, Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import StaleSlot, payload_offset
from hearth.runtime.codec import pack_meta, unpack_meta

TYPE_CHECKING = False
if TYPE_CHECKING:
    import collections
    from typing import Any

    from hearth.dataplane.endpoint import Endpoint

_pack = struct.Struct(FORMAT).pack
_REPLY = int(Kind.REPLY)
REPLY_BATCH = 16  # queued inline replies are sent at this many ...
REPLY_WAIT_S = 0.0005  # ... or once the oldest has waited this long, whichever comes first


def _print_exc() -> None:
    import traceback

    traceback.print_exc()


def write_slot(
    pool: SlotPool, meta: dict[str, Any], body: Any, reserve: int = 0
) -> tuple[Any, int, int]:
    """Allocate a slot and write `[meta][pad][body]`: the one copy into shared memory.
    Returns (slot, meta_len, body_len)."""
    mb = pack_meta(meta, reserve)
    body_mv = memoryview(body).cast("B") if not isinstance(body, memoryview) else body.cast("B")
    off = payload_offset(len(mb))
    slot = pool.alloc(off + body_mv.nbytes)
    slot.buf[: len(mb)] = mb
    slot.buf[off : off + body_mv.nbytes] = body_mv
    return slot, len(mb), body_mv.nbytes


class Wire:
    """Sending: the reply queue of the reader thread, the send lock, reports."""

    eid: int
    agent: int
    pool: SlotPool
    ep: Endpoint
    send_lock: threading.Lock
    reader: threading.Thread
    stash: collections.deque[Descriptor]
    outq: list[tuple[int, bytes]]
    outq_t0: float

    def send(self, d: Descriptor, agents: bool = False) -> None:
        """Send `d`; `agents`: its slot is the agent's already (a reply in the request slot
        the agent owns), so it is not handed over."""
        d.src = self.eid
        if not agents and d.kind == Kind.REPLY and d.slot != NO_SLOT and d.dst == self.agent:
            # the agent owns the reply from now: it survives this process exiting before the
            # agent has read it (else reclaim_dead frees it and a success becomes a 500)
            try:
                self.pool.give_to_creator(d.slot, d.gen)
            except StaleSlot:
                pass
        if d.kind in (Kind.REPLY, Kind.ERROR) and threading.current_thread() is self.reader:
            self._reply_frame(d.dst, d.stamp().pack())
            return
        with self.send_lock:
            self.ep.send(d.stamp())

    def send_reply(
        self, d: Descriptor, slot: int, gen: int, length: int, meta_len: int, agents: bool
    ) -> None:
        """``send(d.reply(slot=..., gen=..., length=..., meta_len=...), agents)``, the frame
        packed at once when it only joins the reader's queue (an answer in the agent's own
        request slot, the warm call's reply): no descriptor object, no checks it never needs."""
        if agents and threading.current_thread() is self.reader:
            dst = d.src
            frame = _pack(
                dst, self.eid, slot, gen, length, _REPLY, 0, 0, d.corr, time.monotonic_ns(),
                meta_len, d.aux,
            )  # fmt: skip
            self._reply_frame(dst, frame)
            return
        r = Descriptor(d.src, d.dst, slot, gen, length, Kind.REPLY, 0, 0, d.corr, 0, meta_len)
        r.aux = d.aux
        self.send(r, agents)

    def _reply_frame(self, dst: int, frame: bytes) -> None:
        """A reply of the reader thread: sent now when the reader's next read would block (no
        request received and waiting, no reply queued), else queued to leave with the others
        (`flush_replies`). Sent from here, the reply leaves before the rest of the call's
        bookkeeping (the handler's timing, the serve loop's checks) instead of after it: the
        agent, woken by it, runs on at once, and that work waits until it sleeps (#19)."""
        if not self.outq and not self.stash and not self.ep.buffered():
            try:
                with self.send_lock:
                    self.ep.send_frame(frame)
                return
            except OSError:  # queued: the serve loop's flush meets it and stops, as before
                pass
        if not self.outq:
            self.outq_t0 = time.perf_counter()
        self.outq.append((dst, frame))

    def flush_replies(self) -> None:
        """Send the reader's queued replies: one message per run of the same destination."""
        q, self.outq = self.outq, []
        if len(q) == 1:  # the usual case: one reply
            with self.send_lock:
                self.ep.send_frame(q[0][1])
            return
        i = 0
        while i < len(q):
            j = i
            while j < len(q) and q[j][0] == q[i][0]:
                j += 1
            with self.send_lock:
                self.ep.send_frame(b"".join(f for _, f in q[i:j]))
            i = j

    def report(self, event: str, in_slot: Descriptor | None = None, **meta: Any) -> None:
        """Report `event` to the agent, in a slot of this instance's own, or in `in_slot`'s: a
        spec marked `Flags.SPEC | Flags.SPEC_REPORT`, read already and left to the agent, which
        takes a report in it from the instance it sent it to (no slot to take on a start's
        path, #19)."""
        meta = {"type": event, "pid": os.getpid(), **meta}
        mb = pack_meta(meta) if in_slot is not None else b""
        if in_slot is not None and len(mb) <= self.pool.capacity(in_slot.slot):
            self.pool.view(in_slot.slot, in_slot.gen, len(mb))[:] = mb
            index, gen, mlen = in_slot.slot, in_slot.gen, len(mb)
        else:
            slot, mlen, _ = write_slot(self.pool, meta, b"")
            index, gen = slot.index, slot.gen
        self.send(Descriptor(dst=self.agent, slot=index, gen=gen, meta_len=mlen, kind=Kind.PONG))

    def _meta(self, d: Descriptor) -> dict[str, Any]:
        return unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len)) if d.meta_len else {}

    def _release(self, d: Descriptor) -> None:
        try:
            self.pool.release(d.slot, d.gen)
        except StaleSlot:
            pass
