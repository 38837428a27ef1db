"""`hearth up --role gateway`: the front gateway's process (the app is `gateway.front`)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from hearth.config import Settings
from hearth.gateway.sojourn import listen
from hearth.process import (
    StartupError,
    cannot_listen,
    collect_heap,
    freeze_heap,
    raise_fd_limit,
    until_signal,
)


async def serve_front(settings: Settings, agents: str, announce: Any = print) -> None:
    """`hearth up --role gateway`: the reverse proxy in front of the node agents."""
    from hearth.gateway.front import Agents, ClusterView, make_front

    if not agents:
        raise StartupError(
            "--role gateway needs HEARTH_NODE_AGENTS (node-agent URLs, or dns+http://service:port)"
        )
    raise_fd_limit()  # each call passed on holds two descriptors (see forward.CallLimit)
    redis = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
    view = ClusterView(redis) if redis is not None else None
    runner = web.AppRunner(
        make_front(
            Agents(agents),
            body_limits=settings.body_limits(),
            cluster=view,
            shed_lag_s=settings.shed_loop_lag_s,
            max_wait_s=settings.max_queue_wait_s,
        ),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=settings.idle_s,  # connections without a request: HEARTH_IDLE_S
    )
    await runner.setup()
    try:
        # as the node listens (`sojourn.listen`): the node's accept backlog (4,096), not
        # aiohttp's 128 (a burst of new connections while the loop is busy waits in the kernel
        # instead of being dropped), and every read stamped for the wait bound
        server = await listen(runner, settings.host, settings.port, backlog=4096)
    except OSError as e:
        await runner.cleanup()
        raise cannot_listen(settings.host, settings.port, e) from None
    freeze_heap()  # as for the node (see freeze_heap): this process is the front from now on
    collector = collect_heap()
    announce(f"hearth: front gateway on {settings.gateway_url} → node agents {agents}")
    await until_signal()
    collector.stop()
    server.close()
    await runner.cleanup()
    if redis is not None:
        await redis.aclose()
