"""A node gateway served in the test's own event loop, as `hearth up` builds and serves it
(`make_app` with a real, unstarted agent; `listen` on loopback, every read stamped), with a
switch that holds the loop back: what the shedding and wait-bound tests need to control the
loop's lag, which a separate `hearth up` process cannot give them."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class InProcessGateway:
    agent: Any  # hearth.node.NodeAgent
    app: Any  # aiohttp.web.Application
    port: int
    hog_s: float
    busy: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def slow(self) -> None:
        """Hold the loop back `hog_s` per turn from now on (until `fast`)."""
        self.busy = True
        asyncio.get_running_loop().call_soon(self._hog)

    def fast(self) -> None:
        self.busy = False

    def _hog(self) -> None:
        if self.busy:
            time.sleep(self.hog_s)
            asyncio.get_running_loop().call_soon(self._hog)


@asynccontextmanager
async def gateway_in_process(
    tmp_path: Path,
    redis_url: str,
    *,
    hog_s: float = 0.1,
    agent_kw: dict[str, Any] | None = None,
    app_kw: dict[str, Any] | None = None,
    runner_kw: dict[str, Any] | None = None,
    before_serving: Callable[[Any], None] | None = None,
) -> AsyncIterator[InProcessGateway]:
    """Yield the served gateway (admin token ``t0k``); everything is stopped and the slot pool
    destroyed on exit. `before_serving(app)` may wrap the app's parts before the runner starts."""
    import redis.asyncio as aioredis
    from aiohttp import web
    from hearth.dataplane.shm import SlotPool
    from hearth.gateway.app import make_app
    from hearth.gateway.sojourn import listen
    from hearth.node import NodeAgent
    from hearth.registry import Registry

    pool = SlotPool.create(f"hearth-gw-{os.getpid()}-{uuid.uuid4().hex[:6]}", [(4096, 4)])
    r = aioredis.Redis.from_url(redis_url)
    try:
        agent = NodeAgent(pool, str(tmp_path / "no-proxy.sock"), **(agent_kw or {}))
        app = make_app(
            agent, Registry(r), admin_token="t0k", max_body_bytes=1 << 20, **(app_kw or {})
        )
        if before_serving is not None:
            before_serving(app)
        runner = web.AppRunner(app, **(runner_kw or {}))
        await runner.setup()
        server = await listen(runner, "127.0.0.1", 0)
        gw = InProcessGateway(agent, app, server.sockets[0].getsockname()[1], hog_s)
        try:
            yield gw
        finally:
            gw.fast()
            server.close()
            await runner.cleanup()
    finally:
        await r.aclose()
        pool.destroy()
