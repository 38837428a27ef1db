"""Which node agents the front gateway tries first: a pure record of connect failures.

An agent that could not be reached (refused, no route, connect timeout) is tried last until it
answers again: a /healthz probe succeeds (the front probes every agent on record every second) or
a call to it does. So one dead node costs one failed connect, not one per request, for as long as
it is dead. (A backoff that ran out between probes used to put a dead node first again: the calls
of that moment each waited out the 2 s connect timeout, then failed over all at once, a burst on
the surviving node.) A restarted node gets its work back within a probe period. Agents are never
dropped while listed: when all are down they are still tried, the one that answered last first
(then in preference order); one no longer listed is forgotten.

A connect timeout is not always the agent's doing: a front whose own loop stalls (a failover
burst on a loaded machine) sees connects time out to agents that answer other calls all along.
Marking such an agent down left every agent "down", so calls went back to the dead home node
first and waited out its connect timeout again, a cascade that lasted to the end of a 20 s run
(CI rehearsal 11). So an agent that answered a call after the failed attempt began stays up.

A call lost mid-request is different: the agent itself dropped the connection. Judged by the
same rule it took nobody down under load (every call in flight on a dying node began before its
last answer), so the calls that came next each waited out their connect timeout (a dead
container's address does not even refuse) before failing over, and the node was taken down
seconds after its death, if at all (scenario (d) under load, docs/cluster.md). A loss takes the
agent down at once (`lost`)."""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field


@dataclass
class AgentHealth:
    #: url -> when its first failure since it last answered was seen
    down: dict[str, float] = field(default_factory=dict)
    #: url -> when it last answered
    answered: dict[str, float] = field(default_factory=dict)
    #: told each agent marked down, when it is, with every agent down then (the front aborts
    #: the calls still connecting to it that can go elsewhere: `connecting.Connecting.down`)
    on_down: Callable[[str, Container[str]], None] | None = field(default=None, repr=False)

    def is_down(self, url: str, now: float) -> bool:
        return url in self.down

    def order(self, urls: list[str], now: float) -> list[str]:
        """`urls` (in preference order) with the agents currently down moved to the end, the
        one that answered last first among those."""
        if not self.down:
            return urls
        up = [u for u in urls if u not in self.down]
        down = [u for u in urls if u in self.down]
        down.sort(key=lambda u: -self.answered.get(u, float("-inf")))  # stable: ties keep order
        return up + down

    def failed(self, url: str, now: float, began: float | None = None) -> bool:
        """A connect to `url` that began at `began` failed at `now`. Whether that marked it down
        (just now): not when it answered another call since `began` (it is alive: the attempt
        failed on this side) nor when it already was."""
        if began is not None and self.answered.get(url, float("-inf")) >= began:
            return False
        if url in self.down:
            return False
        self.down[url] = now
        if self.on_down is not None:
            self.on_down(url, self.down)
        return True

    def lost(self, url: str, now: float) -> bool:
        """The agent at `url` dropped a call's connection mid-request at `now` (reset or closed on
        its side): it went away just now, whatever it answered before, since a call that began
        before its last answer (under load: every call queued there) is no evidence otherwise.
        Whether that marked it down. A live agent that dropped one connection is up again at
        its next answer."""
        return self.failed(url, now, began=now)

    def ok(self, url: str, now: float) -> bool:
        """`url` answered at `now`. Whether it was down until now."""
        self.answered[url] = now
        return self.down.pop(url, None) is not None

    def keep_only(self, urls: list[str]) -> None:
        """Forget the agents no longer listed (a node taken out, a pod's old address behind
        `dns+`): the record, and the probes, would otherwise grow with every one ever seen."""
        listed = set(urls)
        for record in (self.down, self.answered):
            for u in [u for u in record if u not in listed]:
                del record[u]

    def suspects(self) -> list[str]:
        """Agents with a failure on record: probe them."""
        return sorted(self.down)
