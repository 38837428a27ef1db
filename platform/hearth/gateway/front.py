"""The front gateway (`hearth up --role gateway`): a reverse proxy in front of several node agents
(each serves the full API for its node and they share the registry in Redis). An invocation goes
to a node that has a ready instance of its function, else to a node the placement chose for it
(both read from the peer registry in Redis when the front has one), else to the function's home
node (rendezvous hashing over the live agents, as OpenWhisk's home invoker); hashing also breaks
ties. It falls over to the next agent when one does not answer. An agent that failed to answer is
tried last until a probe of its /healthz succeeds (health.py)."""

from __future__ import annotations

import time

from aiohttp import web

from hearth.gateway.agents import Agents, ClusterView, rendezvous
from hearth.gateway.body import BodyLimits
from hearth.gateway.connecting import Connecting
from hearth.gateway.fanout import StatusFanout
from hearth.gateway.forward import CallLimit, Forward, default_call_limit
from hearth.gateway.health import AgentHealth
from hearth.gateway.names import Names
from hearth.gateway.shed import add_shedding
from hearth.gateway.sojourn import READ_STAMPS, ReadStamps
from hearth.gateway.upkeep import Upkeep

# what callers build a front from (`rendezvous`: the home-node order, also used by the cluster)
__all__ = ["Agents", "ClusterView", "make_front", "rendezvous"]


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
    (`hearth.gateway.sojourn`; the reads are stamped when served through `sojourn.listen`).
    The parts: `upkeep.Upkeep` (background work, the session to the agents), `forward.Forward`
    (every call), `agents.py` (which agents, in which order), `health.py` (which are down)."""
    # the node gateway's body rules (hearth.gateway.body): size, deadline, per-client and total
    limits = body_limits or BodyLimits(max_body_bytes=max_body_bytes)
    calls = CallLimit(max_calls or default_call_limit())
    # bodies are streamed through (see forward); client_max_size only bounds request.read()
    app = web.Application(client_max_size=1 << 20)
    # invokes answered 503 + Retry-After while the loop lags, as at the node gateway
    add_shedding(app, shed_lag_s)
    stamps = app[READ_STAMPS] = ReadStamps()
    # calls connecting to an agent marked down fail over at once (when another agent is up)
    connecting = Connecting()
    health = AgentHealth(on_down=connecting.down)
    # agents' names: last good addresses at once, re-resolved in the background (names.py)
    names = Names(refresh_s=2.0, timeout_s=connect_s)
    upkeep = Upkeep(agents, names, health, cluster, timeout_s, connect_s, probe_s, connecting)
    front = Forward(agents, upkeep, cluster, health, limits, calls, stamps, max_wait_s, connecting)

    async def healthz(request: web.Request) -> web.Response:
        now = time.monotonic()
        urls = agents.current()
        return web.json_response(
            {
                "status": "ok",
                "role": "gateway",
                "agents": urls,
                "down": [u for u in urls if health.is_down(u, now)],
                # agents whose names have never resolved: a call to one waits for its lookup
                "unresolved": [
                    u for u, t in zip(urls, upkeep.targets(), strict=True) if not names.resolved(*t)
                ],
                # connects aborted so far because their agent was marked down (each failed over)
                "connects_aborted": connecting.aborts,
            }
        )

    app.on_startup.append(upkeep.start)
    app.on_cleanup.append(upkeep.stop)
    app.router.add_get("/healthz", healthz)
    # every agent's status in one answer (the other paths go to one agent: fanout.py)
    app.router.add_get("/v1/status", StatusFanout(agents, upkeep).handle)
    app.router.add_route("*", "/v1/functions/{name:[a-z0-9][a-z0-9-]*}:invoke", front.proxy)
    app.router.add_route("*", "/{tail:.*}", front.proxy)
    return app
