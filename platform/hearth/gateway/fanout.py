"""The front's `GET /v1/status`: every node agent's status in one answer.

Why: every other path is passed to one agent (hashing the path), so `hearth status` through the
front showed one node of several. Here the front asks every current agent side by side (one
request each, so at most as many at once as there are agents) and answers
`{"role": "gateway", "nodes": {url: status | {"error", "detail"}}}`. The client's Authorization
header is passed on and each agent checks it as for its own /v1/status: an agent's 401/403 is
the answer (never a merged 200). An agent that does not answer within its bound (the connect
timeout + 2 s) is listed with its error; it never fails nor holds back the whole answer. When
no agent answers (none has checked the client's token), the answer is 503 `no_node_agents`."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from hearth.gateway.agents import Agents
from hearth.gateway.upkeep import Upkeep

EXTRA_S = 2.0  # an agent's status after its connect: a few ms when it is well; bound a stuck one
DENIED = (401, 403)


class StatusFanout:
    """The handler of the front's `GET /v1/status` (`handle`)."""

    def __init__(self, agents: Agents, upkeep: Upkeep):
        self.agents = agents
        self.upkeep = upkeep

    def timeout(self) -> aiohttp.ClientTimeout:
        c = self.upkeep.connect_s
        return aiohttp.ClientTimeout(total=c + EXTRA_S, sock_connect=c)

    async def ask(self, base: str, auth: str | None) -> tuple[int | None, dict]:
        """(the agent's HTTP status, its JSON body), or (None, {"error", "detail"}) when it
        could not be asked or its answer is not a JSON object."""
        assert self.upkeep.session is not None  # started with the application
        headers = {"Authorization": auth} if auth is not None else {}
        try:
            async with self.upkeep.session.get(
                base + "/v1/status", headers=headers, timeout=self.timeout(), allow_redirects=False
            ) as r:
                raw = await r.read()
                status = r.status
        except TimeoutError:
            return None, {"error": "timeout", "detail": f"no answer in {self.timeout().total} s"}
        except aiohttp.ClientError as e:
            return None, {"error": "unreachable", "detail": f"{type(e).__name__}: {e}"}
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return None, {"error": "bad_answer", "detail": f"HTTP {status}, not a JSON object"}
        return status, body

    async def handle(self, request: web.Request) -> web.Response:
        urls = self.agents.current()
        auth = request.headers.get("Authorization")
        answers = await asyncio.gather(*(self.ask(u, auth) for u in urls))
        # a refusal of the client's token by any agent is the answer (the agents share it)
        for status, body in answers:
            if status in DENIED:
                return web.json_response(body, status=status)
        if not any(status == 200 for status, _ in answers):
            # no agent checked the client's token: nothing of any node's state goes out
            detail = f"none of the {len(urls)} node agents answered its status"
            return web.json_response({"error": "no_node_agents", "detail": detail}, status=503)
        nodes: dict[str, dict] = {}
        for url, (status, body) in zip(urls, answers, strict=True):
            if status is None or status == 200:
                nodes[url] = body
            else:  # the agent's own error ({error, detail}), kept with its status
                nodes[url] = {
                    "error": str(body.get("error", f"http_{status}")),
                    "detail": f"HTTP {status}: {body.get('detail', '')}",
                }
        return web.json_response({"role": "gateway", "nodes": nodes})
