"""Which node agents the front gateway tries first: a pure record of connect failures.

An agent that could not be reached (refused, no route, connect timeout) is tried last for a
backoff that doubles from `base_s` to `max_s` while it keeps failing, so that one dead node costs
one failed connect, not one per request. A successful request or health probe clears it at once
(a restarted node gets its work back within a probe period). Agents are never dropped: when all
are down they are still tried, in preference order."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AgentHealth:
    base_s: float = 1.0
    max_s: float = 30.0
    #: url -> (down until, current backoff)
    down: dict[str, tuple[float, float]] = field(default_factory=dict)

    def is_down(self, url: str, now: float) -> bool:
        d = self.down.get(url)
        return d is not None and now < d[0]

    def order(self, urls: list[str], now: float) -> list[str]:
        """`urls` (in preference order) with the agents currently down moved to the end."""
        up = [u for u in urls if not self.is_down(u, now)]
        return up + [u for u in urls if self.is_down(u, now)]

    def failed(self, url: str, now: float) -> None:
        _, backoff = self.down.get(url, (0.0, self.base_s / 2))
        backoff = min(self.max_s, backoff * 2)
        self.down[url] = (now + backoff, backoff)

    def ok(self, url: str) -> None:
        self.down.pop(url, None)

    def suspects(self) -> list[str]:
        """Agents with a failure on record (down, or whose backoff ran out untested): probe them."""
        return sorted(self.down)
