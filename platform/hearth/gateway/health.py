"""Which node agents the front gateway tries first: a pure record of connect failures.

An agent that could not be reached (refused, no route, connect timeout) is tried last until it
answers again: a /healthz probe succeeds (the front probes every agent on record every second) or
a call to it does. So one dead node costs one failed connect, not one per request, for as long as
it is dead. (A backoff that ran out between probes used to put a dead node first again: the calls
of that moment each waited out the 2 s connect timeout, then failed over all at once, a burst on
the surviving node.) A restarted node gets its work back within a probe period. Agents are never
dropped while listed: when all are down they are still tried, in preference order; one no longer
listed is forgotten."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AgentHealth:
    #: url -> when its first failure since it last answered was seen
    down: dict[str, float] = field(default_factory=dict)

    def is_down(self, url: str, now: float) -> bool:
        return url in self.down

    def order(self, urls: list[str], now: float) -> list[str]:
        """`urls` (in preference order) with the agents currently down moved to the end."""
        up = [u for u in urls if u not in self.down]
        return up + [u for u in urls if u in self.down]

    def failed(self, url: str, now: float) -> None:
        self.down.setdefault(url, now)

    def ok(self, url: str) -> None:
        self.down.pop(url, None)

    def keep_only(self, urls: list[str]) -> None:
        """Forget the agents no longer listed (a node taken out, a pod's old address behind
        `dns+`): the record, and the probes, would otherwise grow with every one ever seen."""
        listed = set(urls)
        for u in [u for u in self.down if u not in listed]:
            del self.down[u]

    def suspects(self) -> list[str]:
        """Agents with a failure on record: probe them."""
        return sorted(self.down)
