"""How the front gateway passes a call on to a node agent.

`Forward.proxy` admits the call (agents listed, the wait bound since the front read it, the body
limit, `CallLimit`), then `Forward.forward` tries the agents in order (`agents.py`, `health.py`)
and streams the answer back. It fails over only when the request never reached an agent (a
connect error): retrying anything else could run a function, or a deploy, twice."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from hearth.gateway.agents import Agents, ClusterView, rendezvous
from hearth.gateway.body import BodyLimits, BodyRejected, BodyStream
from hearth.gateway.connecting import ConnectAborted, Connecting
from hearth.gateway.health import AgentHealth
from hearth.gateway.shed import overloaded
from hearth.gateway.sojourn import ReadStamps, over_wait, waited
from hearth.gateway.upkeep import Upkeep

log = logging.getLogger("hearth.front")
MAX_CALLS = 16384  # calls passed on at once, at most (default_call_limit)
_SKIP = {"host", "content-length", "transfer-encoding", "connection"}


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


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


@dataclass
class Forward:
    """The front's handler for every route but /healthz (`proxy`)."""

    agents: Agents
    upkeep: Upkeep  # its `session` carries the calls
    cluster: ClusterView | None
    health: AgentHealth
    limits: BodyLimits
    calls: CallLimit
    stamps: ReadStamps
    max_wait_s: float | None
    connecting: Connecting  # the calls connecting to each agent, aborted when it is marked down

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        urls = self.agents.current()
        if not urls:
            return web.json_response(
                {"error": "no_node_agents", "detail": "no node agent is reachable"}, status=503
            )
        fn = request.match_info.get("name")
        if fn is not None and (late := self._late(request)) is not None:
            return late
        name = fn or request.path
        n = request.content_length
        if n is not None and n > self.limits.max_body_bytes:
            return _error(
                413, "payload_too_large", f"body exceeds {self.limits.max_body_bytes} bytes"
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        if n is not None:
            headers["Content-Length"] = str(n)
        # a small body is read now and a larger one streams to the agent (never held whole),
        # both under a deadline; its admission counts only while it is being received (see
        # BodyStream), and a connect error happens before any of a streamed body is read, so
        # the next agent can still be tried
        if self.calls.full():
            detail = f"the gateway is passing on {self.calls.limit} calls, as many as it allows"
            return _body_error(BodyRejected(503, "busy", detail, retry_after=1))
        stream: BodyStream | None = None
        try:
            with self.calls:
                if request.body_exists:
                    stream = BodyStream(request, self.limits)
                    small = await stream.small()
                    body = small if small is not None else stream.chunks()
                else:
                    body = None
                return await self.forward(request, urls, fn, name, headers, body)
        except BodyRejected as e:
            return _body_error(e)
        finally:
            if stream is not None:
                stream.close()

    def _late(self, request: web.Request) -> web.Response | None:
        """503 for an invoke that waited in the front past the bound since it was read:
        passing it on now would only make it, and every call behind it, later still."""
        received_at, now = self.stamps.received_at(request), time.monotonic()
        if not over_wait(received_at, now, self.max_wait_s):
            return None
        assert self.max_wait_s is not None
        return overloaded(
            f"the request waited {waited(received_at, now) * 1000:.0f} ms in the front gateway "
            f"(limit {self.max_wait_s * 1000:.0f} ms): retry later"
        )

    async def forward(
        self,
        request: web.Request,
        urls: list[str],
        fn: str | None,
        name: str,
        headers: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> web.StreamResponse:
        """The call to the first of (at most) three agents that takes it, its answer streamed
        back; the next agent is tried only after a connect error."""
        last = ""
        tries = self.health.order(self._order(fn, name, urls), time.monotonic())[:3]
        for i, base in enumerate(tries):
            began = time.monotonic()
            try:
                async with await self.connecting.request(
                    self.upkeep.session,
                    base,
                    tries[i + 1 :],  # aborted if `base` goes down, only to go to one of these
                    request.method,
                    base + request.path_qs,
                    data=body,
                    headers=headers,
                    # a 3xx is the function's answer to its client: followed here, a function
                    # could send the front's requests (a 307's body too) anywhere it names
                    allow_redirects=False,
                ) as r:
                    return await self._relay(request, base, r)
            except BodyRejected as e:
                return _body_error(e)
            except (
                aiohttp.ClientConnectorError,
                aiohttp.ConnectionTimeoutError,
                ConnectAborted,  # marked down meanwhile, another agent is up: fail over at once
            ) as e:
                # only when the request never reached that agent: retrying anything else could
                # run a function (or a deploy) twice
                last = f"{base}: {type(e).__name__}"
                # logged once per outage: a line per call (hundreds a second after a node dies)
                # is work the front's loop does when it can least afford it
                if self.health.failed(base, time.monotonic(), began):
                    log.warning("node agent %s unreachable: %s (tried last from now)", base, e)
            except aiohttp.ClientConnectionError as e:  # sent, then the agent went away
                return self._lost(base, began, e)
            except (aiohttp.ClientError, TimeoutError) as e:  # sent, then failed: do not repeat
                return _failed(base, e)
        return _error(502, "node_agents_unavailable", f"no node agent could be reached ({last})")

    def _order(self, fn: str | None, name: str, urls: list[str]) -> list[str]:
        """The agents in the order to try them, before health: an invocation's by the cluster
        view when the front has one, anything else by rendezvous hashing of its name."""
        if fn and self.cluster is not None:
            return self.cluster.order(fn, urls)
        return rendezvous(name, urls)

    async def _relay(
        self, request: web.Request, base: str, r: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """The agent's answer, streamed to the client as it comes."""
        out = {k: v for k, v in r.headers.items() if k.lower() not in _SKIP}
        out["X-Hearth-Node-Agent"] = base
        if self.health.ok(base, time.monotonic()):
            log.info("node agent %s answers again", base)
        resp = web.StreamResponse(status=r.status, headers=out)
        if r.content_length is not None:
            resp.content_length = r.content_length
        await resp.prepare(request)
        async for chunk in r.content.iter_chunked(1 << 20):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    def _lost(self, base: str, began: float, e: aiohttp.ClientConnectionError) -> web.Response:
        """The agent went away once the request was sent: not retried (it may have run)."""
        if (rej := _rejected(e)) is not None:
            return _body_error(rej)
        # the agent dropped it (a read timeout would be this side's): down at once
        now = time.monotonic()
        down = (
            self.health.failed(base, now, began)
            if isinstance(e, TimeoutError)
            else self.health.lost(base, now)
        )
        if down:
            log.warning("node agent %s lost mid-request: %s", base, e)
        detail = f"{base} went away mid-request ({type(e).__name__}); not retried"
        return _error(503, "node_agent_lost", detail)


def _failed(base: str, e: BaseException) -> web.Response:
    """The call failed once the request was sent: not retried (it may have run)."""
    if (rej := _rejected(e)) is not None:
        return _body_error(rej)
    return _error(
        502, "node_agent_failed", f"{base} failed mid-request ({type(e).__name__}); not retried"
    )
