"""Shedding on event-loop lag: overload is answered 503 + Retry-After at once, not queued unseen.

Why: when the gateway's event loop falls behind, every request waits in the socket, in the
accept queue and in aiohttp before any admission decision can see it, so the function's queue
bound cannot keep responses short. The loop's own lag is the one figure that sees that wait: a
timer asks to run every `interval_s` and measures how late it runs. While the loop stays later
than `max_lag_s` (two ticks in a row, or its last tick and now), invoke requests are answered
503 `overloaded` with `Retry-After` before their body is read: a rejection costs a fraction of
an invocation, so the loop catches up instead of falling further behind.

`lag_now`/`sheds` are the pure decision core; `LoopLag` is its thin timer shell, and
`add_shedding` puts both on an app (the node gateway's and the front gateway's alike). With
shedding off (`max_lag_s` None or 0) no timer runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

RETRY_AFTER_S = 1


@dataclass
class LagState:
    due: float  # monotonic time the next tick should run
    last_lag_s: float = 0.0  # how late the last tick ran
    prev_lag_s: float = 0.0  # how late the one before it ran
    shed: int = 0  # requests answered 503 so far


def lag_now(st: LagState, now: float) -> float:
    """The loop's sustained lag as seen now: the lesser of the last two ticks' lateness, or of
    the last one and how overdue the next one is (a loop stuck right now has not run its tick
    yet). One late tick alone (the process was descheduled once) is not overload."""
    return min(st.last_lag_s, max(st.prev_lag_s, now - st.due))


def sheds(st: LagState, now: float, max_lag_s: float | None) -> bool:
    """Whether a request arriving now is answered 503 (None or 0: never)."""
    return bool(max_lag_s) and lag_now(st, now) > max_lag_s


class LoopLag:
    """Measures the running loop's lag with a repeating timer (a few hundred cheap callbacks/s)."""

    def __init__(self, max_lag_s: float | None, interval_s: float = 0.005) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self.state = LagState(due=time.monotonic() + interval_s)
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if not self.max_lag_s:
            return  # shedding off: no reason to wake the loop 200 times a second
        self.state.due = time.monotonic() + self.interval_s
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = time.monotonic()
        self.state.prev_lag_s = self.state.last_lag_s
        self.state.last_lag_s = max(0.0, now - self.state.due)
        self.state.due = now + self.interval_s
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
            return reject(
                f"the gateway is {lag_now(lag.state, time.monotonic()) * 1000:.0f} ms behind "
                f"(limit {lag.max_lag_s * 1000:.0f} ms): retry later"
            )
        return await handler(request)

    return shed


LOOP_LAG = web.AppKey("loop_lag", LoopLag)


def is_invoke(request: web.Request) -> bool:
    """What is shed: invocations. Health, metrics and admin requests are always served."""
    return request.path.endswith(":invoke")


def overloaded(detail: str) -> web.Response:
    return web.json_response(
        {"error": "overloaded", "detail": detail},
        status=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


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
