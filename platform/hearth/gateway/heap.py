"""When a gateway process (`hearth up`, node or front) runs its garbage collector: not while its
event loop is behind.

Why: under overload every late answer makes an open-loop client open another connection, and
each connection is a few dozen objects that live long enough to reach the collector's older
generations. CPython's automatic full collection runs whenever the oldest generation grew by a
quarter, so a backlog of 7,000-15,000 connections brought 7-13 full collections per 15 s of
replay at 2,000/s, of up to 1.1-1.8 s each (6.7-10.3 s of the run in full collections alone,
measured with `gc.callbacks` in the gateway, 2026-12-06, load 4-5); with those gone, the young
generations' collections still took 1.7-3.2 s of such a run (every surviving connection object
is walked twice). The pauses made the backlog, and the backlog the pauses. Healthy runs at the
same rate spend 1-2 % of their time collecting.

So (`decide`, the pure rule): the automatic full collection is off for good (`tune`); the young
generations' automatic collections run only while the loop is on time (a tick of the timer no
more than LATE_S late), and are off while it is behind; a full collection runs once the loop has
been on time for CALM_S and FULL_EVERY_S have passed since the last, and at the latest every
FULL_AT_MOST_S however late the loop is. Objects are still freed by reference counting at all
times; only garbage cycles wait, for at most FULL_AT_MOST_S (measured: ~67,000 objects after
30 s of overload at 2,000/s, RSS no higher than with the collector on). `HeapCollector` is the
timer shell.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

#: a full collection at most this often while the loop is on time (CPython ran one every 7-8 s
#: in healthy replay runs at 2,000/s)...
FULL_EVERY_S = 10.0
#: ...once the loop has been on time this long (one on-time tick in a backlog is not calm: a
#: full collection then walked 13,000 connections' objects for 1.8 s)...
CALM_S = 2.0
#: ...and at least this often, however late the loop is
FULL_AT_MOST_S = 60.0
#: how often the timer looks, and how late it may run before the loop counts as behind
CHECK_S, LATE_S = 0.25, 0.05
#: the oldest generation's threshold while `tune`d: never reached
NEVER = 2**31 - 1


@dataclass
class HeapState:
    last_full: float  # monotonic time of the last full collection
    calm_since: float | None = None  # since when every tick ran on time (None: the last was late)


@dataclass(frozen=True)
class Decision:
    young: bool  # automatic collections of the young generations on
    full: bool  # collect the whole heap now


def decide(st: HeapState, now: float, lag_s: float) -> Decision:
    """A tick ran `lag_s` late at `now`: whether the young generations are collected
    automatically from now on, and whether to collect the whole heap now (then the caller
    sets `st.last_full`)."""
    on_time = lag_s <= LATE_S
    if not on_time:
        st.calm_since = None
    elif st.calm_since is None:
        st.calm_since = now
    since = now - st.last_full
    calm = st.calm_since is not None and now - st.calm_since >= CALM_S
    full = since >= FULL_AT_MOST_S or (calm and since >= FULL_EVERY_S)
    return Decision(young=on_time, full=full)


def tune() -> None:
    """The automatic full collection off for good (a `HeapCollector` runs it); the young
    generations keep their thresholds."""
    g0, g1, _ = gc.get_threshold()
    gc.set_threshold(g0, g1, NEVER)


class HeapCollector:
    """Applies `decide` every CHECK_S on the running loop (after `tune`)."""

    def __init__(self, collect: Callable[[], object] = gc.collect) -> None:
        self.collect = collect
        self.state = HeapState(last_full=time.monotonic())
        self.collections = 0  # full collections run
        self.paused = 0  # times the young collections were turned off
        self.due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.state = HeapState(last_full=time.monotonic())
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        gc.enable()

    def _arm(self) -> None:
        self.due = time.monotonic() + CHECK_S
        self._handle = asyncio.get_running_loop().call_later(CHECK_S, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        d = decide(self.state, now, max(0.0, now - self.due))
        if d.young and not gc.isenabled():
            gc.enable()
        elif not d.young and gc.isenabled():
            gc.disable()
            self.paused += 1
        if d.full:
            self.collect()
            self.collections += 1
            self.state.last_full = time.monotonic()
        self._arm()


class GcPauses:
    """Times every collection of this process (`gc.callbacks`) into `observe(generation,
    seconds)`: the node's `hearth_gc_pause_seconds`. Two clock reads and one observation per
    collection (a 2,000/s replay run makes ~40 a second, nearly all of the youngest
    generation)."""

    def __init__(self, observe: Callable[[int, float], object]) -> None:
        self.observe = observe
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0:
            self.observe(info["generation"], time.perf_counter() - self._t0)
            self._t0 = 0.0

    def install(self) -> GcPauses:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
