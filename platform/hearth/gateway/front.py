"""The front gateway (`hearth up --role gateway`): a reverse proxy in front of several node agents
(each serves the full API for its node and they share the registry in Redis). An invocation goes
to a node that has a ready instance of its function, else to a node the placement chose for it
(both read from the peer registry in Redis when the front has one), else to the function's home
node (rendezvous hashing over the live agents, as OpenWhisk's home invoker); hashing also breaks
ties. It falls over to the next agent when one does not answer. An agent that failed to answer is
tried last until a probe of its /healthz succeeds (health.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from hearth.gateway.body import BodyLimits, BodyRejected, BodyStream
from hearth.gateway.health import AgentHealth
from hearth.gateway.names import Names
from hearth.gateway.shed import add_shedding, overloaded
from hearth.gateway.sojourn import READ_STAMPS, ReadStamps, over_wait, waited

log = logging.getLogger("hearth.front")
MAX_CALLS = 16384  # calls passed on at once, at most (default_call_limit)
_SKIP = {"host", "content-length", "transfer-encoding", "connection"}


def rendezvous(key: str, nodes: list[str]) -> list[str]:
    """Nodes in preference order for `key` (highest random weight first): stable when nodes come and go."""
    return sorted(
        nodes,
        key=lambda n: hashlib.blake2b(f"{n}|{key}".encode(), digest_size=8).digest(),
        reverse=True,
    )


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


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


def _rejected(e: BaseException) -> BodyRejected | None:
    """The client library wraps an error raised by the body iterator: was it ours?"""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, BodyRejected):
            return x
    return None


def _body_error(e: BodyRejected) -> web.Response:
    hdrs = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return web.json_response({"error": e.error, "detail": e.detail}, status=e.status, headers=hdrs)


@dataclass
class CallLimit:
    """Calls the front is passing on at once, each holding a connection from its client and one
    to a node (file descriptors): past `limit` a call is answered 503 + Retry-After at once,
    never queued behind the others (a queue in front of the connections would make every call
    wait for the slowest node, a dead one's connect timeout included)."""

    limit: int
    active: int = 0

    def full(self) -> bool:
        return self.active >= self.limit

    def __enter__(self) -> CallLimit:
        self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.active -= 1


def default_call_limit() -> int:
    """Half the descriptors this process may open, less some for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(MAX_CALLS, (soft - 512) // 2))


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


def make_front(
    agents: Agents,
    timeout_s: float = 300.0,
    connect_s: float = 2.0,
    probe_s: float = 1.0,
    cluster: ClusterView | None = None,
    max_body_bytes: int = 256 << 20,
    body_limits: BodyLimits | None = None,
    shed_lag_s: float | None = None,
    max_calls: int | None = None,
    max_wait_s: float | None = None,
) -> web.Application:
    """`max_wait_s`: the node's wait bound (HEARTH_MAX_QUEUE_WAIT_S) applied here too: an invoke
    whose handler runs later than that after the front read it is answered 503 at once
    (`hearth.gateway.sojourn`; the reads are stamped when served through `sojourn.listen`)."""
    # the node gateway's body rules (hearth.gateway.body): size, deadline, per-client and total
    limits = body_limits or BodyLimits(max_body_bytes=max_body_bytes)
    max_body_bytes = limits.max_body_bytes
    calls = CallLimit(max_calls or default_call_limit())
    # bodies are streamed through (see proxy); client_max_size only bounds request.read()
    app = web.Application(client_max_size=1 << 20)
    # invokes answered 503 + Retry-After while the loop lags, as at the node gateway
    add_shedding(app, shed_lag_s)
    stamps = app[READ_STAMPS] = ReadStamps()
    session: dict[str, aiohttp.ClientSession] = {}
    health = AgentHealth()
    tasks: list[asyncio.Task] = []
    # agents' names: last good addresses at once, re-resolved in the background (names.py)
    names = Names(refresh_s=2.0, timeout_s=connect_s)

    def targets() -> list[tuple[str, int]]:
        """The agents' (host, port), whose addresses `names` keeps current."""
        return [((u := urlsplit(url)).hostname or "", u.port or 80) for url in agents.current()]

    async def start(_: web.Application) -> None:
        if agents.dynamic:
            await agents.refresh(names)
        await names.warm(targets())
        tasks.append(asyncio.create_task(names_loop(), name="front-names"))
        if cluster is not None:
            await cluster.refresh()
            tasks.append(asyncio.create_task(view_loop(cluster), name="front-cluster-view"))
        session["s"] = aiohttp.ClientSession(
            # a dead node's address may not even refuse: bound the connect, not just the total
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s),
            auto_decompress=False,
            # a fresh connection per request: a dead agent then fails at connect (safe to retry
            # elsewhere), never on a pooled connection after the request may have been sent;
            # names from `names` (re-resolved every 2 s in the background: a restarted node may
            # come back on another address; a call never waits on DNS); no connection limit of
            # its own (it would queue every call behind the pending connects to a dead node):
            # CallLimit bounds the calls instead
            connector=aiohttp.TCPConnector(
                force_close=True, use_dns_cache=False, resolver=names, limit=0
            ),
        )
        tasks.append(asyncio.create_task(probe_loop(), name="front-probe"))

    async def stop(_: web.Application) -> None:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await session["s"].close()

    async def view_loop(view: ClusterView) -> None:
        while True:
            await asyncio.sleep(view.refresh_s)
            await view.refresh()

    async def names_loop() -> None:
        """The agents' list (dns+) every agents.refresh_s, their names every names.refresh_s."""
        due = time.monotonic() + agents.refresh_s
        while True:
            await asyncio.sleep(names.refresh_s)
            if agents.dynamic and time.monotonic() >= due:
                await agents.refresh(names)
                due = time.monotonic() + agents.refresh_s
            names.refresh(targets())

    async def probe(s: aiohttp.ClientSession, base: str) -> None:
        try:
            async with s.get(base + "/healthz", allow_redirects=False) as r:
                if r.status == 200 and health.ok(base, time.monotonic()):
                    log.info("node agent %s answers again", base)
        except (aiohttp.ClientError, TimeoutError):
            health.failed(base, time.monotonic())
        except Exception as e:  # e.g. an unusable agent URL: the loop must go on
            log.warning("probe of node agent %s failed: %r", base, e)

    async def probe_loop() -> None:
        """Every `probe_s`, ask the listed agents with a failure on record for /healthz. The
        probes run side by side, at most one per agent: a dead agent's probe waits out its
        connect timeout (2 s) and must not hold back one that answers again; an agent that is no
        longer listed is forgotten, not probed for ever."""
        timeout = aiohttp.ClientTimeout(total=connect_s)
        connector = aiohttp.TCPConnector(force_close=True, use_dns_cache=False, resolver=names)
        probing: dict[str, asyncio.Task] = {}
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            try:
                while True:
                    await asyncio.sleep(probe_s)
                    health.keep_only(agents.current())
                    for base in health.suspects():
                        if base not in probing:
                            t = probing[base] = asyncio.create_task(probe(s, base))
                            t.add_done_callback(lambda _t, b=base: probing.pop(b, None))
            finally:
                for t in list(probing.values()):
                    t.cancel()
                await asyncio.gather(*probing.values(), return_exceptions=True)

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
        fn = request.match_info.get("name")
        if fn is not None and (late := _late(request)) is not None:
            return late
        name = fn or request.path
        n = request.content_length
        if n is not None and n > max_body_bytes:
            return _error(413, "payload_too_large", f"body exceeds {max_body_bytes} bytes")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        if n is not None:
            headers["Content-Length"] = str(n)
        # a small body is read now and a larger one streams to the agent (never held whole),
        # both under a deadline; its admission counts only while it is being received (see
        # BodyStream), and a connect error happens before any of a streamed body is read, so
        # the next agent can still be tried
        if calls.full():
            detail = f"the gateway is passing on {calls.limit} calls, as many as it allows"
            return _body_error(BodyRejected(503, "busy", detail, retry_after=1))
        stream: BodyStream | None = None
        try:
            with calls:
                if request.body_exists:
                    stream = BodyStream(request, limits)
                    small = await stream.small()
                    body = small if small is not None else stream.chunks()
                else:
                    body = None
                return await forward(request, urls, fn, name, headers, body)
        except BodyRejected as e:
            return _body_error(e)
        finally:
            if stream is not None:
                stream.close()

    def _late(request: web.Request) -> web.Response | None:
        """503 for an invoke that waited in the front past the bound since it was read:
        passing it on now would only make it, and every call behind it, later still."""
        received_at, now = stamps.received_at(request), time.monotonic()
        if not over_wait(received_at, now, max_wait_s):
            return None
        assert max_wait_s is not None
        return overloaded(
            f"the request waited {waited(received_at, now) * 1000:.0f} ms in the front gateway "
            f"(limit {max_wait_s * 1000:.0f} ms): retry later"
        )

    async def forward(
        request: web.Request,
        urls: list[str],
        fn: str | None,
        name: str,
        headers: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> web.StreamResponse:
        last = ""
        if fn and cluster is not None:
            order = cluster.order(fn, urls)
        else:
            order = rendezvous(name, urls)
        for base in health.order(order, time.monotonic())[:3]:
            began = time.monotonic()
            try:
                async with session["s"].request(
                    request.method,
                    base + request.path_qs,
                    data=body,
                    headers=headers,
                    # a 3xx is the function's answer to its client: followed here, a function
                    # could send the front's requests (a 307's body too) anywhere it names
                    allow_redirects=False,
                ) as r:
                    out = {k: v for k, v in r.headers.items() if k.lower() not in _SKIP}
                    out["X-Hearth-Node-Agent"] = base
                    if health.ok(base, time.monotonic()):
                        log.info("node agent %s answers again", base)
                    resp = web.StreamResponse(status=r.status, headers=out)
                    if r.content_length is not None:
                        resp.content_length = r.content_length
                    await resp.prepare(request)
                    async for chunk in r.content.iter_chunked(1 << 20):
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
            except BodyRejected as e:
                return _body_error(e)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                # only when the request never reached that agent: retrying anything else could
                # run a function (or a deploy) twice
                last = f"{base}: {type(e).__name__}"
                # logged once per outage: a line per call (hundreds a second after a node dies)
                # is work the front's loop does when it can least afford it
                if health.failed(base, time.monotonic(), began):
                    log.warning("node agent %s unreachable: %s (tried last from now)", base, e)
            except aiohttp.ClientConnectionError as e:  # sent, then the agent went away
                if (rej := _rejected(e)) is not None:
                    return _body_error(rej)
                if health.failed(base, time.monotonic(), began):
                    log.warning("node agent %s lost mid-request: %s", base, e)
                return web.json_response(
                    {
                        "error": "node_agent_lost",
                        "detail": f"{base} went away mid-request ({type(e).__name__}); not retried",
                    },
                    status=503,
                )
            except (aiohttp.ClientError, TimeoutError) as e:  # sent, then failed: do not repeat
                if (rej := _rejected(e)) is not None:
                    return _body_error(rej)
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
