"""The round endpoint's receive slots: ``fan_in`` pool slots, pre-faulted once and kept for the
server's whole life, and the hand-over of a slot to the next update while a fold pass still
reads it.

Why kept: a slot handed back to the pool may have its pages dropped (the pool trims freed
slots), and the next round would fault them in again while receiving. These slots only go back
to the server's own free list, so a later round receives into pages that are already mapped.
Taking a slot blocks while all are lent out: a client whose update has no slot is simply not
read (TCP flow control), which bounds the server's memory.

Why hand over: with ``fan_in`` slots, every slot of a fold pass used to wait for the whole pass,
and so did the next clients' copies. A pass that will never read its inputs again (they were
checked finite, and it folds in place) hands its slots over when it starts: each goes back to
the free list *while still being read*, with a read frontier. The next update may write a slot
only below that frontier (its **credit**): the pass reads front to back and moves the frontier
every few MiB, so the next copy follows it instead of waiting for the pass to end. A socket
update waits for credit here (:meth:`RecvSlot.wait_credit`); a shared-memory client is sent it
(``SLOT_CREDIT`` frames, from the thread that moves the frontier, under the slots' lock so a
credit never overtakes its grant).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
ALL = 1 << 62  # credit when no pass reads the slot: the whole slot may be written
Sink = Callable[[int], bool]  # sends a credit to a writer; False: the writer is gone


class Kept:
    """One kept pool slot and what a fold pass still reads of it (under the slots' lock)."""

    __slots__ = ("slot", "view", "base", "read_upto", "reader", "landed", "writer", "sent")

    def __init__(self, slot: Any, view: memoryview):
        self.slot, self.view = slot, view
        self.base = np.frombuffer(view, np.uint8).ctypes.data
        self.read_upto = ALL  # bytes below this may be written (ALL: no pass reads the slot)
        self.reader: RecvSlot | None = None  # the lending whose update a pass still reads
        self.landed: RecvSlot | None = None  # the lending whose update waits for its pass
        self.writer: tuple[RecvSlot, Sink] | None = None  # a shm writer sent its credits
        self.sent = 0  # the last credit sent to `writer`


class RecvSlot:
    """One lending of a kept slot to one update. ``release`` gives the slot back to the server,
    not the pool (the pages stay mapped). Once a pass has handed the slot over, releasing this
    lending only ends the pass's read (the slot is already lent to the next update)."""

    __slots__ = (
        "kept",
        "_owner",
        "granted_at",
        "waited",
        "landed",
        "length",
        "check",
        "handed_over",
        "done",
    )

    def __init__(self, kept: Kept, owner: RecvSlots):
        self.kept, self._owner = kept, owner
        self.granted_at = 0.0
        self.waited = 0.0
        self.landed = False  # the update is complete in the slot (queued for the fold)
        self.length = 0  # shared-memory path: the update's length, from SLOT_REQUEST
        self.check: Any = None  # ... (its header, its StreamScan) once the header is written
        self.handed_over = False  # a pass reads its update while the slot is lent again
        self.done = False  # released

    @property
    def slot(self) -> Any:
        return self.kept.slot

    @property
    def view(self) -> memoryview:
        return self.kept.view

    def credit(self) -> int:
        """Bytes of the slot this lending may write now (a pass may still read the rest)."""
        return self.kept.read_upto

    def wait_credit(self, upto: int) -> int:
        """Block until the first ``upto`` bytes may be written; returns the credit (>= upto,
        or less if the server is closing)."""
        return self._owner._wait_credit(self.kept, upto)

    def land(self) -> None:
        """The update is complete in the slot: it no longer counts as arriving."""
        self._owner._landed(self)

    def release(self) -> None:
        self._owner._release(self)


class RecvSlots:
    """``count`` pre-faulted slots of ``nbytes`` each from ``pool``."""

    def __init__(self, pool: Any, count: int, nbytes: int):
        self._free: queue.Queue[Kept] = queue.Queue()
        self._all: list[Kept] = []
        self._cond = threading.Condition(threading.Lock())
        self._arriving = 0
        self.closed = False
        self.handovers = 0  # slots lent again while a pass still read them
        self.credits_sent = 0  # SLOT_CREDIT frames sent to shared-memory writers
        self.credit_waits = 0  # socket reads that waited for a pass to move its frontier
        for _ in range(max(1, count)):
            slot = pool.alloc(nbytes)
            view = slot.buf[:nbytes]
            np.frombuffer(view, np.uint8)[::PAGE] = 0  # pre-fault: the receive never faults
            k = Kept(slot, view)
            self._all.append(k)
            self._free.put(k)

    # -- lending ------------------------------------------------------------------------------
    def take(
        self,
        length: int = 0,
        *,
        credits: bool = True,
        grant: Callable[[RecvSlot, int], None] | None = None,
        sink: Sink | None = None,
    ) -> RecvSlot:
        """A free slot (blocks until one is released: backpressure); ``waited`` says how long.
        A pass may still read it: write it only below :meth:`RecvSlot.credit`. ``credits``
        False: wait until no pass reads it (a writer that cannot follow a frontier).
        ``grant(rs, credit)`` tells the writer (under the lock, so no credit overtakes it);
        ``sink`` then gets every new credit until the writer has the first ``length`` bytes."""
        t = time.monotonic()
        k = self._free.get()
        rs = RecvSlot(k, self)
        rs.granted_at, rs.length = t, length
        try:
            with self._cond:
                self._arriving += 1
                while not credits and k.reader is not None and not self.closed:
                    self._cond.wait(0.5)
                if not credits and k.reader is not None:  # closing: the pass may still read it
                    raise OSError("the round endpoint is closing")
                if grant is not None:
                    grant(rs, k.read_upto)
                if sink is not None and k.read_upto < (length or len(k.view)):
                    k.writer, k.sent = (rs, sink), k.read_upto
        except BaseException:
            rs.release()
            raise
        rs.waited = time.monotonic() - t
        return rs

    def _wait_credit(self, k: Kept, upto: int) -> int:
        with self._cond:
            self.credit_waits += k.read_upto < upto
            while k.read_upto < upto and not self.closed:
                self._cond.wait(0.5)
            return k.read_upto

    def arriving(self) -> int:
        """Updates being written into a slot right now (taken, not yet complete or released)."""
        return self._arriving

    def _landed(self, rs: RecvSlot) -> None:
        with self._cond:
            if not rs.landed:
                rs.landed = True
                self._arriving -= 1
                if not rs.done:
                    rs.kept.landed = rs

    def _release(self, rs: RecvSlot) -> None:
        self._landed(rs)  # a failed update stops arriving too
        k = rs.kept
        with self._cond:
            if rs.done:
                return
            rs.done = True
            if k.landed is rs:
                k.landed = None
            if rs.handed_over:  # already free: the pass is over, the next writer has it all
                if k.reader is rs:
                    self._end_read(k)
                return
            if k.writer is not None and k.writer[0] is rs:
                k.writer = None  # a writer that left: no more credits to it
        self._free.put(k)

    # -- hand-over while a pass reads ---------------------------------------------------------
    def reading(self, starts: list[int], upto: list[int], final: bool = False) -> None:
        """A fold pass that never reads its inputs again reports how far it got: for each input
        (by the address of its first data byte) the address below which it is done. Its first
        report hands the slots over (they go back to the free list while being read); the
        ``final`` one ends the read. Inputs that are not in these slots are ignored. Passes
        over one slot never overlap (the endpoint has one fold thread, and an update is folded
        only after the pass before it in that slot has ended), so a slot has one reader."""
        with self._cond:
            for a, u in zip(starts, upto, strict=True):
                k = next((k for k in self._all if k.base <= a < k.base + len(k.view)), None)
                if k is None or (k.reader is None and not self._hand_over(k)):
                    continue
                if final:
                    self._end_read(k)
                elif u - k.base > k.read_upto:
                    k.read_upto = u - k.base
                    self._credit(k)
            self._cond.notify_all()

    def _hand_over(self, k: Kept) -> bool:
        """(lock held) A pass starts reading ``k``'s landed update: lend ``k`` again now."""
        rs = k.landed
        if rs is None or rs.done or k.reader is not None:
            return False
        rs.handed_over = True
        k.landed, k.reader, k.read_upto = None, rs, 0
        self.handovers += 1
        self._free.put(k)
        return True

    def _end_read(self, k: Kept) -> None:
        """(lock held) No pass reads ``k`` any more: its writer may write all of it."""
        k.reader, k.read_upto = None, ALL
        self._credit(k)
        self._cond.notify_all()

    def _credit(self, k: Kept) -> None:
        """(lock held) Send the writer of ``k`` its new credit, until it has all it needs (it
        reads no credit frame after that one)."""
        if k.writer is None or k.read_upto <= k.sent:
            return
        rs, sink = k.writer
        k.sent = k.read_upto
        sent = sink(min(k.read_upto, len(k.view)))
        self.credits_sent += 1
        if not sent or k.read_upto >= (rs.length or len(k.view)):
            k.writer = None

    def held(self) -> int:
        """Slots currently lent to updates (0 between rounds)."""
        return len(self._all) - self._free.qsize()

    def reads(self) -> int:
        """Slots a pass still reads (0 between passes)."""
        return sum(k.reader is not None for k in self._all)

    def handles(self) -> list[tuple[int, int]]:
        """(index, gen) of every slot: what a shared-memory client maps before round 1."""
        return [(k.slot.index, k.slot.gen) for k in self._all]

    def close(self) -> None:
        """Hand every slot back to the pool."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for k in self._all:
            k.slot.release()
        self._all.clear()


def socket_sink(sock: socket.socket, send: Callable[[socket.socket, int], None]) -> Sink:
    """A credit sink for a shared-memory writer's socket. ``send`` must not block: a writer
    that does not read its credits is dropped (its socket is shut down, so its session ends
    and gives the slot back)."""

    def sink(upto: int) -> bool:
        try:
            send(sock, upto)
            return True
        except OSError:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False

    return sink
