"""A node's queue service stops all its runners at once: each runner's stop waits for its
reader's blocked read (up to `block_ms`, 0.5 s) and its in-flight invocations, and one after
another that added up at every node's shutdown (4.8 s for test_e2e.py's node). Real runners on
the real redis-server, an in-process invoker."""

from __future__ import annotations

import asyncio

from hearth.queue.inproc import InProcessInvoker
from hearth.spec import FunctionSpec
from hearth.triggers import QueueService
from queue_helpers import wait_for


async def test_the_services_runners_are_all_told_to_stop_at_once(redis_url):
    svc = QueueService(redis_url, InProcessInvoker({}), node="stop-test")
    await svc.start([FunctionSpec(name=f"f{i}", handler="m:h") for i in range(3)])
    runners = [r for rs in svc.runners.values() for r in rs]
    assert len(runners) == 3  # (each function's async stream)
    await wait_for(lambda: all(r.ready.is_set() for r in runners), 30)
    stopping = asyncio.ensure_future(svc.stop())
    try:
        await wait_for(lambda: any(r._stopping.is_set() for r in runners), 30)
        # one after another, the next runner was told only once the first one's blocked
        # read had returned
        assert all(r._stopping.is_set() for r in runners), [r._stopping.is_set() for r in runners]
        await asyncio.wait_for(stopping, 60)
    finally:
        if not stopping.done():
            await asyncio.wait({stopping}, timeout=60)
    assert svc.runners == {} and svc.r is None
    assert all(t.done() for r in runners for t in r._loops)  # every reader has ended
