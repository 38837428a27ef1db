"""What the `start_call` tests share: `Outcomes`, the `done` callback they give the invoker,
`until`, a bounded poll of the node's state, `pool_node`, a node with a warm pool of one, and
`pool_start`, one call started from a pool instance."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from hearth.config import Settings
from hearth.invoke import InvokeError, InvokeResult
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

TOKEN = "test-token-123456"


class Outcomes:
    """A `done` callback that records what it was given; `one()` waits for exactly one."""

    def __init__(self) -> None:
        self.got: list[InvokeResult | InvokeError] = []
        self.came = asyncio.Event()

    def __call__(self, out: InvokeResult | InvokeError) -> None:
        self.got.append(out)
        self.came.set()

    async def one(self, timeout: float = 30) -> InvokeResult | InvokeError:
        await asyncio.wait_for(self.came.wait(), timeout)
        await asyncio.sleep(0.05)  # a second call, if any, would come meanwhile
        assert len(self.got) == 1, self.got
        return self.got[0]


async def until(cond, what: str, timeout: float = 20) -> None:
    """Poll `cond` every 20 ms until it holds; fail naming `what` after `timeout` s."""
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def pool_node(redis_url: str, prefix: str) -> AsyncIterator[Platform]:
    """A real node agent in this process with a warm pool of one (`hearth.up.Platform`), its
    state directory removed at the end."""
    s = Settings.from_env(port=free_port(), redis_url=redis_url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix=prefix))
    s.admin_token = TOKEN
    try:
        async with Platform(s, warm_pool_size=1) as p:
            yield p
    finally:
        shutil.rmtree(s.state, ignore_errors=True)


async def pool_ready(agent) -> None:
    """Until the node has a pool instance waiting (`pooled`)."""
    await until(
        lambda: any(i.state == "pooled" for i in agent.table.pooled.values()),
        "a pool instance",
        timeout=30,
    )


async def pool_start(agent, spec: dict, body: bytes = b"{}") -> InvokeResult | InvokeError:
    """Deploy `spec`, wait for a pool instance, and make one JSON call started from the read
    (`Invoker.start_call`, as the lean HTTP path does); its one outcome."""
    await agent.deploy(parse_spec(spec))
    await pool_ready(agent)
    out = Outcomes()
    assert agent.invoker.start_call(spec["name"], body, done=out, content_type="application/json")
    return await out.one()
