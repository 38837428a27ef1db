"""The agent's bounded busy-poll for a reply (issue #19): the shell around `spin_policy`.

`ReplySpin` keeps the books the policy reads (each function's `FunctionSpin`: round trips that
spun and that slept, counted only when the loop reached a select that would sleep) and is told by
the dataplane link when a call leaves (`sent`) and when its reply comes (`replied`).
`SpinSelector` wraps the event loop's selector: where the loop would sleep in ``epoll_wait``
while the watched call is out, it polls the same selector without blocking (``select(0)``: the
reply, a new request, anything) until the budget ends, then sleeps as before. So a spin delays
nothing (any event ends it), runs only when the loop has no callback ready (asyncio then
selects with a timeout of 0: no spin), and costs only CPU, counted in
``hearth_agent_spin_seconds_total``.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable
from typing import Any

from hearth.agent.spin_policy import NEVER_SEEN, FunctionSpin, SpinConfig, settle, should_spin
from hearth.metrics import Metrics

FUNCTIONS = 1024  # functions whose books are kept (past that, the least recently settled goes)


class ReplySpin:
    """One node's spin state; `in_flight()` counts the node's calls in flight."""

    def __init__(self, cfg: SpinConfig, in_flight: Callable[[], int], metrics: Metrics) -> None:
        self.cfg = cfg
        self.in_flight = in_flight
        self.books: dict[str, FunctionSpin] = {}
        self.key: bytes | None = None  # the watched call: the only one in flight when sent
        self.function = ""
        self.sent_at = 0.0
        self.armed = False  # the policy chose to spin for it...
        self.deadline = 0.0  # ...until here (0: no spin armed, or no longer)
        self.waited = False  # the loop reached a select that would sleep while it was out
        self._hits = metrics.spins.labels("hit")
        self._misses = metrics.spins.labels("miss")
        self._seconds = metrics.spin_seconds

    def sent(self, key: bytes, function: str, in_flight: int) -> None:
        """A call left for an instance; `in_flight` counts it with the node's others."""
        if in_flight != 1:  # others in flight: no spin, nothing learnt
            self.key, self.deadline = None, 0.0
            return
        budget = should_spin(self.books.get(function, NEVER_SEEN), in_flight, self.cfg)
        now = time.perf_counter()
        self.key, self.function, self.sent_at = key, function, now
        self.armed = budget > 0
        self.deadline = now + budget if budget else 0.0
        self.waited = False

    def replied(self, key: bytes) -> None:
        """The reply to `key` is being dispatched (the link's reader callback)."""
        if key != self.key:
            return
        now = time.perf_counter()
        if self.armed and self.deadline and self.waited:
            self._hits.inc()  # (a miss was counted when the budget ran out)
        books = self.books
        if self.waited:  # (else the reply came before the loop would sleep: no evidence)
            state = books.pop(self.function, NEVER_SEEN)  # (re-inserted last: most recent)
            if len(books) >= FUNCTIONS:  # evict the least recently settled (deleted functions)
                del books[next(iter(books))]
            missed = self.armed and not self.deadline  # (cleared when the budget ran out)
            books[self.function] = settle(state, self.armed, now - self.sent_at, self.cfg, missed)
        self.key, self.deadline = None, 0.0

    def poll(
        self, inner: selectors.BaseSelector, until: float | None = None
    ) -> list[tuple[Any, int]]:
        """Poll `inner` without blocking until something is ready or the budget ends (then
        []: a miss, counted), or until `until` (perf_counter: the loop's next timer is due; []
        without a miss, the spin still armed for the next select). Called only while a spin
        is armed."""
        if self.in_flight() != 1:  # another call joined (a chained call, a retry): not alone
            self.key, self.deadline = None, 0.0
            return []
        clock = time.perf_counter
        start = clock()
        end = self.deadline if until is None else min(self.deadline, until)
        select = inner.select
        while True:
            ready = select(0)
            now = clock()
            if ready or now >= end:
                break
        self._seconds.inc(now - start)
        if not ready and end == self.deadline:
            self.deadline = 0.0
            self._misses.inc()
        return ready


class SpinSelector:
    """The loop's selector, spinning first while one of its `spins` has a spin armed."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self.inner = inner
        self.spins: list[ReplySpin] = []

    def __getattr__(self, name: str) -> Any:  # register, modify, unregister, get_key, ...
        return getattr(self.inner, name)

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is None or timeout > 0:  # (0: the loop has callbacks ready: no spin)
            for spin in self.spins:
                if spin.key is not None:
                    spin.waited = True  # the loop would sleep now with the call out
                if spin.deadline:
                    t0 = time.perf_counter()
                    # (spin no further than the loop's next timer: it would run late)
                    ready = spin.poll(self.inner, None if timeout is None else t0 + timeout)
                    if ready:
                        return ready
                    if timeout is not None:
                        timeout = max(0.0, timeout - (time.perf_counter() - t0))
                    break
        return self.inner.select(timeout)


def install(loop: Any, spin: ReplySpin) -> bool:
    """Let `spin` poll in `loop`'s selector (a selector event loop's; False for another loop)."""
    sel = getattr(loop, "_selector", None)
    if sel is None:
        return False
    if not isinstance(sel, SpinSelector):
        sel = loop._selector = SpinSelector(sel)
    sel.spins.append(spin)
    return True


def uninstall(loop: Any, spin: ReplySpin) -> None:
    sel = getattr(loop, "_selector", None)
    if isinstance(sel, SpinSelector) and spin in sel.spins:
        sel.spins.remove(spin)
        if not sel.spins:
            loop._selector = sel.inner
