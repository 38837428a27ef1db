"""The front gateway (`hearth up --role gateway`): a reverse proxy in front of several node agents
(each serves the full API for its node and they share the registry in Redis). Invocations of a
function go to its home node (rendezvous hashing over the live agents, so warm instances are hit,
as OpenWhisk's home invoker), falling over to the next agent when one does not answer."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

log = logging.getLogger("hearth.front")
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


class _TooLarge(Exception):
    pass


async def _bounded(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, never more than `limit` bytes (nothing is buffered whole)."""
    total = 0
    async for chunk in content.iter_chunked(1 << 20):
        total += len(chunk)
        if total > limit:
            raise _TooLarge()
        yield chunk


def make_front(
    agents: Agents, timeout_s: float = 300.0, max_body_bytes: int = 256 << 20
) -> web.Application:
    # bodies are streamed through (see proxy); client_max_size only bounds request.read()
    app = web.Application(client_max_size=1 << 20)
    session: dict[str, aiohttp.ClientSession] = {}

    async def start(_: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            auto_decompress=False,
            # a fresh connection per request: a dead agent then fails at connect (safe to retry
            # elsewhere), never on a pooled connection after the request may have been sent
            connector=aiohttp.TCPConnector(force_close=True),
        )

    async def stop(_: web.Application) -> None:
        await session["s"].close()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": "gateway", "agents": agents.current()})

    async def proxy(request: web.Request) -> web.StreamResponse:
        urls = agents.current()
        if not urls:
            return web.json_response(
                {"error": "no_node_agents", "detail": "no node agent is reachable"}, status=503
            )
        name = request.match_info.get("name") or request.path
        n = request.content_length
        if n is not None and n > max_body_bytes:
            return _error(413, "payload_too_large", f"body exceeds {max_body_bytes} bytes")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        if n is not None:
            headers["Content-Length"] = str(n)
        # the body streams to the agent; a connect error happens before any of it is read, so
        # the next agent can still be tried
        body = _bounded(request.content, max_body_bytes) if request.body_exists else None
        last = ""
        for base in rendezvous(name, urls)[:3]:
            try:
                async with session["s"].request(
                    request.method, base + request.path_qs, data=body, headers=headers
                ) as r:
                    out = {k: v for k, v in r.headers.items() if k.lower() not in _SKIP}
                    out["X-Hearth-Node-Agent"] = base
                    resp = web.StreamResponse(status=r.status, headers=out)
                    if r.content_length is not None:
                        resp.content_length = r.content_length
                    await resp.prepare(request)
                    async for chunk in r.content.iter_chunked(1 << 20):
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
            except _TooLarge:
                return _error(413, "payload_too_large", f"body exceeds {max_body_bytes} bytes")
            except aiohttp.ClientConnectorError as e:
                # only when the request never reached that agent: retrying anything else could
                # run a function (or a deploy) twice
                last = f"{base}: {type(e).__name__}"
                log.warning("node agent %s unreachable: %s", base, e)
            except (aiohttp.ClientError, TimeoutError) as e:  # sent, then failed: do not repeat
                if isinstance(e.__cause__, _TooLarge) or isinstance(e.__context__, _TooLarge):
                    return _error(413, "payload_too_large", f"body exceeds {max_body_bytes} bytes")
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
