"""When a gateway process (`hearth up`, node or front) collects its whole heap: not while its
event loop is behind.

Why: under overload every late answer makes an open-loop client open another connection, and
each connection is a few dozen objects that live long enough to reach the collector's oldest
generation. CPython's automatic full collection runs whenever that generation grew by a quarter,
so a backlog of 7,000-15,000 connections brought 7-13 full collections per 15 s of replay at
2,000/s, of up to 1.1-1.8 s each (6.7-10.3 s of the run in full collections alone, measured
with `gc.callbacks` in the gateway, 2026-12-06, load 4-5): the pauses made the backlog, and
the backlog the pauses. Healthy runs at the same rate had 1-2 full collections of 4-22 ms.

So the automatic full collection is off (`tune`: the young generations keep CPython's
thresholds, they are what frees request-scoped garbage), and a timer runs it instead: every
FULL_EVERY_S while the loop is on time, and at the latest every FULL_AT_MOST_S however late
the loop is (garbage cycles that reached the old generation are still freed under sustained
overload, a pause per FULL_AT_MOST_S instead of several a second). `full_collection_due` is
the pure rule; `HeapCollector` its timer shell.
"""

from __future__ import annotations

import asyncio
import gc
import time

#: a full collection at most this often while the loop is on time (CPython ran one every 7-8 s
#: in healthy replay runs at 2,000/s)
FULL_EVERY_S = 10.0
#: and at least this often, however late the loop is
FULL_AT_MOST_S = 120.0
#: how often the timer looks, and how late it may run before the loop counts as behind
CHECK_S, LATE_S = 1.0, 0.05
#: the oldest generation's threshold while `tune`d: never reached (collections of the two
#: younger generations are counted up to it)
NEVER = 2**31 - 1


def full_collection_due(since_last_s: float, lag_s: float) -> bool:
    """Whether to collect the whole heap now, `since_last_s` after the last full collection,
    with the loop `lag_s` behind (how late the timer asking this ran)."""
    if since_last_s >= FULL_AT_MOST_S:
        return True
    return lag_s <= LATE_S and since_last_s >= FULL_EVERY_S


def tune() -> None:
    """Hand the full collections to a `HeapCollector`: the automatic one is off, the young
    generations' thresholds are kept."""
    g0, g1, _ = gc.get_threshold()
    gc.set_threshold(g0, g1, NEVER)


class HeapCollector:
    """Runs `full_collection_due` every CHECK_S on the running loop (after `tune`)."""

    def __init__(self, collect=gc.collect) -> None:
        self.collect = collect
        self.last = time.monotonic()
        self.collections = 0
        self.due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.last = time.monotonic()
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        self.due = time.monotonic() + CHECK_S
        self._handle = asyncio.get_running_loop().call_later(CHECK_S, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        if full_collection_due(now - self.last, max(0.0, now - self.due)):
            self.collect()
            self.collections += 1
            self.last = time.monotonic()
        self._arm()
