"""The front gateway's background work and its connections to the node agents.

Why apart from the calls: a call must never wait on DNS, Redis or a probe. Everything a call
routes on is kept current here, off the call path: the agents' list (`dns+`) and their names
(`names.py`), the cluster view (`agents.ClusterView`), and /healthz probes of the agents with a
failure on record (`health.py`). `session` is the client session the calls are passed on with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from hearth.gateway.agents import Agents, ClusterView
from hearth.gateway.connecting import Connecting
from hearth.gateway.health import AgentHealth
from hearth.gateway.names import Names

log = logging.getLogger("hearth.front")


class Upkeep:
    """Started and stopped with the front's application (`start`, `stop` are its hooks)."""

    def __init__(
        self,
        agents: Agents,
        names: Names,
        health: AgentHealth,
        cluster: ClusterView | None,
        timeout_s: float,
        connect_s: float,
        probe_s: float,
        connecting: Connecting | None = None,
    ):
        self.agents = agents
        self.names = names
        self.health = health
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.connect_s = connect_s
        self.probe_s = probe_s
        # the calls connecting to each agent (aborted when it is marked down)
        self.connecting = connecting or Connecting()
        self.session: aiohttp.ClientSession | None = None  # set by start
        self.tasks: list[asyncio.Task] = []

    def targets(self) -> list[tuple[str, int]]:
        """The agents' (host, port), whose addresses `names` keeps current."""
        return [
            ((u := urlsplit(url)).hostname or "", u.port or 80) for url in self.agents.current()
        ]

    async def start(self, _: web.Application) -> None:
        if self.agents.dynamic:
            await self.agents.refresh(self.names)
        await self.names.warm(self.targets())
        self.tasks.append(asyncio.create_task(self.names_loop(), name="front-names"))
        if self.cluster is not None:
            await self.cluster.refresh()
            self.tasks.append(
                asyncio.create_task(self.view_loop(self.cluster), name="front-cluster-view")
            )
        self.session = aiohttp.ClientSession(
            # a dead node's address may not even refuse: bound the connect, not just the total
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_s),
            auto_decompress=False,
            # a fresh connection per request: a dead agent then fails at connect (safe to retry
            # elsewhere), never on a pooled connection after the request may have been sent;
            # names from `names` (re-resolved every 2 s in the background: a restarted node may
            # come back on another address; a call never waits on DNS); no connection limit of
            # its own (it would queue every call behind the pending connects to a dead node):
            # CallLimit bounds the calls instead
            connector=self.connecting.connector(
                force_close=True, use_dns_cache=False, resolver=self.names, limit=0
            ),
        )
        self.tasks.append(asyncio.create_task(self.probe_loop(), name="front-probe"))

    async def stop(self, _: web.Application) -> None:
        for t in self.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.session.close()

    async def view_loop(self, view: ClusterView) -> None:
        while True:
            await asyncio.sleep(view.refresh_s)
            await view.refresh()

    async def names_loop(self) -> None:
        """The agents' list (dns+) every agents.refresh_s, their names every names.refresh_s."""
        due = time.monotonic() + self.agents.refresh_s
        while True:
            await asyncio.sleep(self.names.refresh_s)
            if self.agents.dynamic and time.monotonic() >= due:
                await self.agents.refresh(self.names)
                due = time.monotonic() + self.agents.refresh_s
            self.names.refresh(self.targets())

    async def probe(self, s: aiohttp.ClientSession, base: str) -> None:
        try:
            async with s.get(base + "/healthz", allow_redirects=False) as r:
                if r.status == 200 and self.health.ok(base, time.monotonic()):
                    log.info("node agent %s answers again", base)
        except (aiohttp.ClientError, TimeoutError):
            self.health.failed(base, time.monotonic())
        except Exception as e:  # e.g. an unusable agent URL: the loop must go on
            log.warning("probe of node agent %s failed: %r", base, e)

    async def probe_loop(self) -> None:
        """Every `probe_s`, ask the listed agents with a failure on record for /healthz. The
        probes run side by side, at most one per agent: a dead agent's probe waits out its
        connect timeout (2 s) and must not hold back one that answers again; an agent that is no
        longer listed is forgotten, not probed for ever."""
        timeout = aiohttp.ClientTimeout(total=self.connect_s)
        connector = aiohttp.TCPConnector(force_close=True, use_dns_cache=False, resolver=self.names)
        probing: dict[str, asyncio.Task] = {}
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            try:
                while True:
                    await asyncio.sleep(self.probe_s)
                    self.health.keep_only(self.agents.current())
                    for base in self.health.suspects():
                        if base not in probing:
                            t = probing[base] = asyncio.create_task(self.probe(s, base))
                            t.add_done_callback(lambda _t, b=base: probing.pop(b, None))
            finally:
                for t in list(probing.values()):
                    t.cancel()
                await asyncio.gather(*probing.values(), return_exceptions=True)
