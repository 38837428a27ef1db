"""Call deadlines on one event-loop timer.

Why: a timer per call (``call_later`` when it is sent, ``cancel`` when its reply comes) is a
handle, two heap operations in the loop and a cancelled entry for the loop to sweep, on every
warm invocation; nearly all calls are answered long before their deadline. Here a call only
pushes `(deadline, future)` onto a heap; one loop timer is armed for the earliest deadline
(re-armed only when an earlier one arrives, which calls sent in order with the same timeout
never do), and when it fires, it fails the calls still waiting and skips the answered ones.
Answered entries are dropped in bulk whenever the heap has doubled (amortised O(1) a call).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from typing import Any


def expire(fut: asyncio.Future | Bound) -> None:
    """The call's time is up: its waiter gets TimeoutError (an answered call is left alone)."""
    if not fut.done():
        fut.set_exception(TimeoutError())


class Bound:
    """A waited-for future's entry on a `Deadlines` heap, let go of (`end`) when the wait ends:
    the heap keeps an entry until its time is due or a compaction, and an ended future holds
    its result or its error, whose traceback holds the waiter's frames (a call's payload, its
    instance) for that long."""

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future) -> None:
        self.fut: asyncio.Future | None = fut

    def done(self) -> bool:
        return self.fut is None or self.fut.done()

    def set_exception(self, e: BaseException) -> None:
        if self.fut is not None:
            self.fut.set_exception(e)

    def end(self) -> None:
        self.fut = None


class Deadlines:
    """Fails each added future with TimeoutError at its deadline (loop time) unless it is done
    by then; at most one loop timer is pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, asyncio.Future | Bound]] = []
        self._seq = itertools.count()  # ties: futures do not compare
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the pending timer fires
        self._compact_at = 256  # heap size that triggers dropping answered entries

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, fut: asyncio.Future | Bound) -> None:
        """Fail `fut` at loop time `when` if it is not done by then."""
        heapq.heappush(self._heap, (when, next(self._seq), fut))
        if when < self._at:
            self._arm(when)
        if len(self._heap) >= self._compact_at:
            self._compact()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._at = None, math.inf

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        self._handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle, self._at = None, math.inf
        now = self.loop.time()
        # self._heap, not a local: an expiry's callback may add a deadline, and an add may
        # compact (a new list) -- a local would then arm for entries already gone
        while self._heap and (self._heap[0][0] <= now or self._heap[0][2].done()):
            expire(heapq.heappop(self._heap)[2])
        if self._heap:
            self._arm(self._heap[0][0])

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if not e[2].done()]
        heapq.heapify(self._heap)
        self._compact_at = max(256, 2 * len(self._heap))


class AfterTimer:
    """Expires `fut` `delay` seconds after `after` resolves (however it resolves)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay: float,
        fut: asyncio.Future,
        after: asyncio.Future,
    ) -> None:
        self.loop, self.delay, self.fut, self.after = loop, delay, fut, after
        self.handle: asyncio.TimerHandle | None = None
        after.add_done_callback(self.arm)

    def arm(self, _: Any = None) -> None:
        if not self.fut.done():
            self.handle = self.loop.call_later(self.delay, expire, self.fut)

    def cancel(self) -> None:
        self.after.remove_done_callback(self.arm)
        if self.handle is not None:
            self.handle.cancel()
