"""Shedding on event-loop lag: overload is answered 503 + Retry-After at once, not queued unseen.

Why: when the gateway's event loop falls behind, every request waits in the socket, in the
accept queue and in aiohttp before any admission decision can see it, so the function's queue
bound cannot keep responses short. The loop's own lag is the one figure that sees that wait: a
timer asks to run every `interval_s` and measures how late it runs. While the loop stays later
than `max_lag_s` (several ticks in a row, for several times `max_lag_s`: see `sheds`), invoke
requests are answered 503 `overloaded` with `Retry-After` before their body is read: a
rejection costs a fraction of an invocation, so the loop catches up instead of falling further
behind. A single stall (a busy machine descheduling the process, a burst of connections) is not
overload: it ends with an on-time tick, and nothing is shed for it.

`record_tick`/`lag_now`/`sheds` are the pure decision core; `LoopLag` is its thin timer shell,
and `add_shedding` puts both on an app (the node gateway's and the front gateway's alike). With
shedding off (`max_lag_s` None or 0) no timer runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from hearth.gateway import answer

#: the loop must stay behind this many ticks in a row (the one overdue now included)...
LATE_TICKS = 3
#: ...and for this many times the lag limit, before invokes are shed
HOLD = 4


@dataclass
class LagState:
    due: float  # monotonic time the next tick should run
    last_lag_s: float = 0.0  # how late the last tick ran
    behind_since: float | None = None  # when the run of ticks later than the limit began
    late_ticks: int = 0  # ticks in that run
    shed: int = 0  # requests answered 503 so far


def record_tick(st: LagState, now: float, max_lag_s: float, interval_s: float) -> None:
    """A tick ran at `now`: how late, and whether the run of late ticks goes on or ends."""
    st.last_lag_s = max(0.0, now - st.due)
    if st.last_lag_s > max_lag_s:
        if st.behind_since is None:
            st.behind_since = st.due
        st.late_ticks += 1
    else:
        st.behind_since, st.late_ticks = None, 0
    st.due = now + interval_s


def lag_now(st: LagState, now: float) -> float:
    """How far behind the loop is as seen now: its last tick's lateness, or how overdue the
    next one is (it waits behind the work running now)."""
    return max(st.last_lag_s, now - st.due)


def sheds(st: LagState, now: float, max_lag_s: float | None) -> bool:
    """Whether a request arriving now is answered 503 (None or 0: never).

    Only sustained lag is overload: at least LATE_TICKS ticks in a row (the one overdue now
    counts) later than `max_lag_s`, over at least HOLD x `max_lag_s`. One stall, however long
    (the process descheduled on a busy machine, a burst of connections), ends with an on-time
    tick and sheds nothing: what queued during it is served once the loop catches up. A loop
    that cannot catch up stays behind tick after tick, and sheds."""
    if not max_lag_s:
        return False
    since, late = st.behind_since, st.late_ticks
    if now - st.due > max_lag_s:
        since = st.due if since is None else since
        late += 1
    return since is not None and late >= LATE_TICKS and now - since >= HOLD * max_lag_s


#: the lag timer runs this many times per lag limit, within [MIN_TICK_S, MAX_TICK_S]
TICKS_PER_LIMIT = 10
MIN_TICK_S, MAX_TICK_S = 0.002, 0.05


def tick_interval(max_lag_s: float | None) -> float:
    """How often the lag timer runs: fine enough to see a lag of `max_lag_s` (LATE_TICKS late
    ticks fit well inside the HOLD x limit that `sheds` waits for), and no finer. A fixed 5 ms
    tick woke an idle gateway 200 times a second and cost 7-10 % of the agent's CPU per warm
    invoke at the 0.5 s default (interleaved runs, #19); at 0.5 s it now runs 20 times a
    second."""
    if not max_lag_s:
        return MAX_TICK_S
    return min(MAX_TICK_S, max(MIN_TICK_S, max_lag_s / TICKS_PER_LIMIT))


class LoopLag:
    """Measures the running loop's lag with a repeating timer (a few cheap callbacks/s)."""

    def __init__(self, max_lag_s: float | None, interval_s: float | None = None) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = tick_interval(max_lag_s) if interval_s is None else interval_s
        self.state = LagState(due=time.monotonic() + self.interval_s)
        self._handle: asyncio.TimerHandle | None = None
        # told each tick's lateness (seconds): the node's `hearth_loop_lag_seconds`
        self.on_lag: Callable[[float], object] | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if not self.max_lag_s:
            return  # shedding off: no reason to wake the loop at all
        self.state.due = time.monotonic() + self.interval_s
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = time.monotonic()
        if self.on_lag is not None:
            self.on_lag(max(0.0, now - self.state.due))
        record_tick(self.state, now, self.max_lag_s or 0.0, self.interval_s)
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    async def on_startup(self, _app: web.Application) -> None:
        self.start()

    async def on_cleanup(self, _app: web.Application) -> None:
        self.stop()

    def sheds(self) -> bool:
        return sheds(self.state, time.monotonic(), self.max_lag_s)


def shed_middleware(
    lag: LoopLag, applies: Callable[[web.Request], bool], reject: Callable[[str], web.Response]
) -> Callable:
    """An aiohttp middleware answering `reject(detail)` (503 + Retry-After) to requests that
    `applies` to while the loop lags; the others (health, admin) are served as usual."""

    @web.middleware
    async def shed(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if applies(request) and lag.sheds():
            lag.state.shed += 1
            return reject(lag_detail(lag))
        return await handler(request)

    return shed


def lag_detail(lag: LoopLag) -> str:
    """What a request shed for loop lag is told."""
    return (
        f"the gateway is {lag_now(lag.state, time.monotonic()) * 1000:.0f} ms behind "
        f"(limit {(lag.max_lag_s or 0) * 1000:.0f} ms): retry later"
    )


LOOP_LAG = web.AppKey("loop_lag", LoopLag)


def is_invoke(request: web.Request) -> bool:
    """What is shed: invocations. Health, metrics and admin requests are always served."""
    return request.path.endswith(":invoke")


def overloaded(detail: str) -> web.Response:
    return answer.overloaded(detail).response()


def add_shedding(
    app: web.Application,
    max_lag_s: float | None,
    reject: Callable[[str], web.Response] = overloaded,
) -> LoopLag:
    """Shed `app`'s invocations while its loop lags more than `max_lag_s` (None: never): the
    middleware goes first, the timer runs while the app does (`app[LOOP_LAG]`)."""
    lag = LoopLag(max_lag_s)
    app.middlewares.insert(0, shed_middleware(lag, is_invoke, reject))
    app.on_startup.append(lag.on_startup)
    app.on_cleanup.append(lag.on_cleanup)
    app[LOOP_LAG] = lag
    return lag
