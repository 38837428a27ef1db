"""The round endpoint's receive slots: ``fan_in`` pool slots, pre-faulted once and kept for the
server's whole life.

Why kept: a slot handed back to the pool may have its pages dropped (the pool trims freed
slots), and the next round would fault them in again while receiving. These slots only go back
to the server's own free list, so a later round receives into pages that are already mapped.
Taking a slot blocks while all are lent out: a client whose update has no slot is simply not
read (TCP flow control), which bounds the server's memory.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


class RecvSlot:
    """A receive slot lent to one update; ``release`` gives it back to the server, not the pool
    (the pages stay mapped for the next round)."""

    __slots__ = ("slot", "view", "_owner", "granted_at", "waited", "landed", "length", "check")

    def __init__(self, slot: Any, view: memoryview, owner: RecvSlots):
        self.slot, self.view, self._owner = slot, view, owner
        self.granted_at = 0.0
        self.waited = 0.0
        self.landed = False  # the update is complete in the slot (queued for the fold)
        self.length = 0  # shared-memory path: the update's length, from SLOT_REQUEST
        self.check: Any = None  # ... (its header, its StreamScan) once the header is written

    def land(self) -> None:
        """The update is complete in the slot: it no longer counts as arriving."""
        self._owner._landed(self)

    def release(self) -> None:
        self._owner._release(self)


class RecvSlots:
    """``count`` pre-faulted slots of ``nbytes`` each from ``pool``."""

    def __init__(self, pool: Any, count: int, nbytes: int):
        self._free: queue.Queue[RecvSlot] = queue.Queue()
        self._all: list[RecvSlot] = []
        self._lock = threading.Lock()
        self._arriving = 0
        for _ in range(max(1, count)):
            slot = pool.alloc(nbytes)
            view = slot.buf[:nbytes]
            np.frombuffer(view, np.uint8)[::PAGE] = 0  # pre-fault: the receive never faults
            rs = RecvSlot(slot, view, self)
            self._all.append(rs)
            self._free.put(rs)

    def take(self) -> RecvSlot:
        """A free slot (blocks until one is released: backpressure); ``waited`` says how long."""
        t = time.monotonic()
        rs = self._free.get()
        rs.granted_at = t
        rs.waited = time.monotonic() - t
        rs.landed = False
        rs.length, rs.check = 0, None
        with self._lock:
            self._arriving += 1
        return rs

    def arriving(self) -> int:
        """Updates being written into a slot right now (taken, not yet complete or released)."""
        return self._arriving

    def _landed(self, rs: RecvSlot) -> None:
        with self._lock:
            if not rs.landed:
                rs.landed = True
                self._arriving -= 1

    def _release(self, rs: RecvSlot) -> None:
        self._landed(rs)  # a failed update stops arriving too
        self._free.put(rs)

    def held(self) -> int:
        """Slots currently lent to updates (0 between rounds)."""
        return len(self._all) - self._free.qsize()

    def handles(self) -> list[tuple[int, int]]:
        """(index, gen) of every slot: what a shared-memory client maps before round 1."""
        return [(rs.slot.index, rs.slot.gen) for rs in self._all]

    def close(self) -> None:
        """Hand every slot back to the pool."""
        for rs in self._all:
            rs.slot.release()
        self._all.clear()
