"""The front gateway's node agents: which there are (`Agents`) and in which order a call tries
them (`rendezvous`, `ClusterView.order`). Kept apart from the front's HTTP handling so the order
rules read (and are tested) on their own; `health.py` moves agents that failed to the back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from hearth.gateway.names import Names

log = logging.getLogger("hearth.front")


def rendezvous(key: str, nodes: list[str]) -> list[str]:
    """Nodes in preference order for `key` (highest random weight first): stable when nodes come and go."""
    return sorted(
        nodes,
        key=lambda n: hashlib.blake2b(f"{n}|{key}".encode(), digest_size=8).digest(),
        reverse=True,
    )


class Agents:
    """The node agents' base URLs: a fixed list, or `dns+http://name:port` whose addresses are
    refreshed every few s (a Kubernetes headless Service gives one A record per node-agent pod).
    Names are resolved through `Names` in the background (`refresh`), never on the loop or in a
    call: while the DNS does not answer, the last good addresses stay."""

    def __init__(self, spec: str, refresh_s: float = 5.0):
        self.spec = spec
        self.refresh_s = refresh_s
        self.parts = [p.strip() for p in spec.split(",") if p.strip()]
        # until the first refresh: the fixed URLs (a dns+ part adds nothing yet)
        self.urls: list[str] = [p.rstrip("/") for p in self.parts if not p.startswith("dns+")]

    @property
    def dynamic(self) -> bool:
        """Whether some part is re-resolved (then the front runs `refresh` every refresh_s)."""
        return any(p.startswith("dns+") for p in self.parts)

    def current(self) -> list[str]:
        return self.urls

    async def refresh(self, names: Names) -> None:
        out: list[str] = []
        for part in self.parts:
            if not part.startswith("dns+"):
                out.append(part.rstrip("/"))
                continue
            u = urlsplit(part[4:])
            port = u.port or 80
            try:
                addrs = await names.lookup(u.hostname or "", port, socket.AF_INET)
            except OSError:
                continue  # never resolved yet: nothing to add
            out += sorted({f"{u.scheme}://{ip}:{port}" for _, ip in addrs})
        self.urls = out


class ClusterView:
    """The peers' announcements and the placement, read from Redis every `refresh_s` by the
    front's background task: a call routes on the last view and never waits on Redis (nor on a
    new Redis connection's DNS lookup while the network's DNS is down)."""

    def __init__(self, redis: Any, refresh_s: float = 0.5):
        from hearth.cluster.peers import PeerRegistry

        self.r = redis
        self.registry = PeerRegistry(redis)
        self.refresh_s = refresh_s
        self.peers: dict[str, Any] = {}
        self.plan: dict[str, list[str]] = {}
        self.failing = False  # the last refresh failed (logged once, not every refresh_s)

    async def refresh(self) -> None:
        try:
            from hearth.cluster.member import PLAN_KEY

            async with asyncio.timeout(max(2.0, 4 * self.refresh_s)):
                peers = await self.registry.live()
                raw = await self.r.get(PLAN_KEY)
            self.peers, self.plan = peers, json.loads(raw) if raw else {}
        except Exception as e:  # Redis away: keep routing on what we knew, and by hash
            if not self.failing:
                log.warning("front: cannot read the peer registry: %s", e)
            self.failing = True
        else:
            if self.failing:
                log.info("front: the peer registry answers again")
            self.failing = False

    def order(self, function: str, urls: list[str]) -> list[str]:
        """`urls` in the order to try for `function`: ready instance, placed host, the rest."""
        by_url = {p.http.rstrip("/"): p for p in self.peers.values() if p.http}
        hosts = set(self.plan.get(function) or ())
        ready = [u for u in urls if u in by_url and by_url[u].ready.get(function)]
        placed = [u for u in urls if u in by_url and by_url[u].node in hosts and u not in ready]
        rest = [u for u in urls if u not in ready and u not in placed]
        return (
            rendezvous(function, ready) + rendezvous(function, placed) + rendezvous(function, rest)
        )
