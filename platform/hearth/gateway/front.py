"""The front gateway (`hearth up --role gateway`): a reverse proxy in front of several node agents
(each serves the full API for its node and they share the registry in Redis). Invocations of a
function go to its home node (rendezvous hashing over the live agents, so warm instances are hit,
as OpenWhisk's home invoker), falling over to the next agent when one does not answer. An agent
that failed to answer is tried last until a probe of its /healthz succeeds (health.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from hearth.gateway.health import AgentHealth

log = logging.getLogger("hearth.front")
_SKIP = {"host", "content-length", "transfer-encoding", "connection"}


def rendezvous(key: str, nodes: list[str]) -> list[str]:
    """Nodes in preference order for `key` (highest random weight first): stable when nodes come and go."""
    return sorted(
        nodes,
        key=lambda n: hashlib.blake2b(f"{n}|{key}".encode(), digest_size=8).digest(),
        reverse=True,
    )


class Agents:
    """The node agents' base URLs: a fixed list, or `dns+http://name:port` re-resolved every few s
    (a Kubernetes headless Service gives one A record per node-agent pod)."""

    def __init__(self, spec: str, refresh_s: float = 5.0):
        self.spec = spec
        self.refresh_s = refresh_s
        self.urls: list[str] = []
        self._at = 0.0

    def current(self) -> list[str]:
        if time.monotonic() - self._at > self.refresh_s or not self.urls:
            self.urls = self._resolve()
            self._at = time.monotonic()
        return self.urls

    def _resolve(self) -> list[str]:
        out: list[str] = []
        for part in (p.strip() for p in self.spec.split(",") if p.strip()):
            if part.startswith("dns+"):
                u = urlsplit(part[4:])
                try:
                    infos = socket.getaddrinfo(u.hostname, u.port or 80, type=socket.SOCK_STREAM)
                except OSError:
                    continue
                out += sorted({f"{u.scheme}://{i[4][0]}:{u.port or 80}" for i in infos})
            else:
                out.append(part.rstrip("/"))
        return out


def make_front(
    agents: Agents, timeout_s: float = 300.0, connect_s: float = 2.0, probe_s: float = 1.0
) -> web.Application:
    app = web.Application(client_max_size=1024**3)
    session: dict[str, aiohttp.ClientSession] = {}
    health = AgentHealth()
    tasks: list[asyncio.Task] = []

    async def start(_: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(
            # a dead node's address may not even refuse: bound the connect, not just the total
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s),
            auto_decompress=False,
            # a fresh connection per request: a dead agent then fails at connect (safe to retry
            # elsewhere), never on a pooled connection after the request may have been sent;
            # names re-resolved every 2 s (a restarted node may come back on another address)
            connector=aiohttp.TCPConnector(force_close=True, ttl_dns_cache=2),
        )
        tasks.append(asyncio.create_task(probe_loop(), name="front-probe"))

    async def stop(_: web.Application) -> None:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await session["s"].close()

    async def probe_loop() -> None:
        """Every `probe_s`, ask the agents with a failure on record for /healthz."""
        timeout = aiohttp.ClientTimeout(total=connect_s)
        connector = aiohttp.TCPConnector(force_close=True, use_dns_cache=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            while True:
                await asyncio.sleep(probe_s)
                for base in health.suspects():
                    try:
                        async with s.get(base + "/healthz") as r:
                            if r.status == 200:
                                health.ok(base)
                                log.info("node agent %s answers again", base)
                    except (aiohttp.ClientError, TimeoutError):
                        health.failed(base, time.monotonic())

    async def healthz(request: web.Request) -> web.Response:
        now = time.monotonic()
        urls = agents.current()
        return web.json_response(
            {
                "status": "ok",
                "role": "gateway",
                "agents": urls,
                "down": [u for u in urls if health.is_down(u, now)],
            }
        )

    async def proxy(request: web.Request) -> web.StreamResponse:
        urls = agents.current()
        if not urls:
            return web.json_response(
                {"error": "no_node_agents", "detail": "no node agent is reachable"}, status=503
            )
        name = request.match_info.get("name") or request.path
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        last = ""
        for base in health.order(rendezvous(name, urls), time.monotonic())[:3]:
            try:
                async with session["s"].request(
                    request.method, base + request.path_qs, data=body, headers=headers
                ) as r:
                    data = await r.read()
                    out = {k: v for k, v in r.headers.items() if k.lower() not in _SKIP}
                    out["X-Hearth-Node-Agent"] = base
                    health.ok(base)
                    return web.Response(status=r.status, body=data, headers=out)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                # only when the request never reached that agent: retrying anything else could
                # run a function (or a deploy) twice
                last = f"{base}: {type(e).__name__}"
                health.failed(base, time.monotonic())
                log.warning("node agent %s unreachable: %s", base, e)
            except aiohttp.ClientConnectionError as e:  # sent, then the agent went away
                health.failed(base, time.monotonic())
                log.warning("node agent %s lost mid-request: %s", base, e)
                return web.json_response(
                    {
                        "error": "node_agent_lost",
                        "detail": f"{base} went away mid-request ({type(e).__name__}); not retried",
                    },
                    status=503,
                )
            except (aiohttp.ClientError, TimeoutError) as e:  # sent, then failed: do not repeat
                return web.json_response(
                    {
                        "error": "node_agent_failed",
                        "detail": f"{base} failed mid-request ({type(e).__name__}); not retried",
                    },
                    status=502,
                )
        return web.json_response(
            {
                "error": "node_agents_unavailable",
                "detail": f"no node agent could be reached ({last})",
            },
            status=502,
        )

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/v1/functions/{name:[a-z0-9][a-z0-9-]*}:invoke", proxy)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
