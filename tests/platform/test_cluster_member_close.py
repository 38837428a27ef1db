"""A cluster member's close ends its heartbeat even when the heartbeat's cancel is lost inside a
tick: a Redis call can drop a cancel that arrives as its own wait completes, and the tick then
returns normally. `Member.close` waited for that task with nothing else to end it, so
`hearth up` hung at shutdown until it was killed (30 s later, `LocalNode.stop`): seen in the
teardowns of test_multinode.py on a loaded machine (docs/testing.md, "Parallel pytest
processes")."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import redis.asyncio as aioredis
from hearth.cluster.member import Member, MemberConfig
from hearth.cluster.peers import PeerRegistry


async def test_close_ends_the_heartbeat_when_a_tick_drops_its_cancel(redis_url):
    r = aioredis.Redis.from_url(redis_url)
    cfg = MemberConfig(
        node="node-c", token=b"close-test-token-0123456789", http_url="http://c", heartbeat_s=0.05
    )
    agent = SimpleNamespace(pool=None, deployed=lambda: [], ready_counts=lambda: {})
    m = Member(agent, r, cfg)
    await m.start()
    real_tick, in_tick, dropped = m.tick, asyncio.Event(), []
    closing: asyncio.Future | None = None
    try:
        assert "node-c" in await PeerRegistry(r, cfg.peer_ttl_s).live()  # a real tick ran

        async def tick_dropping_its_cancel() -> None:
            await real_tick()
            in_tick.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:  # lost here, as inside that Redis call
                dropped.append(True)

        m.tick = tick_dropping_its_cancel  # type: ignore[method-assign]
        await asyncio.wait_for(in_tick.wait(), 30)
        closing = asyncio.ensure_future(m.close())
        done, _ = await asyncio.wait({closing}, timeout=10)
        # before the fix it waited for ever: the loop beat on after the lost cancel
        assert done, "close() still waits for the heartbeat 10 s after its cancel was lost"
        closing.result()
        assert dropped == [True]  # the cancel did reach the tick, and was lost there
        assert m._task is not None and m._task.done()
        assert "node-c" not in await PeerRegistry(r, cfg.peer_ttl_s).live()  # withdrawn
    finally:
        m.tick = real_tick  # type: ignore[method-assign]
        while m._task is not None and not m._task.done():  # (a failed run: end the loop)
            m._task.cancel()
            await asyncio.wait({m._task}, timeout=1)
        if closing is not None:
            await asyncio.wait({closing}, timeout=10)
        await r.aclose()
