"""Helpers for the queue tests: real runners with an in-process Invoker (the Invoker interface,
not a mock: handlers run for real in this process) against the real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from hearth.queue.consumer import StreamTriggerRunner
from hearth.queue.inproc import InProcessInvoker
from hearth.spec import StreamTrigger


async def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll an (async or sync) predicate until truthy; fail the test with a clear message."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def trigger(stream: str = "events", **kw: Any) -> StreamTrigger:
    params = dict(
        stream=stream,
        batch_size=16,
        max_inflight=8,
        max_deliveries=3,
        backoff_s=0.05,
        backoff_max_s=0.2,
        claim_idle_s=1.0,
    )
    params.update(kw)
    return StreamTrigger(**params)


def runner(
    redis_url: str,
    handlers: dict[str, Any],
    fn: str = "fn",
    trig: StreamTrigger | None = None,
    consumer: str = "c1",
    **kw: Any,
) -> StreamTriggerRunner:
    return StreamTriggerRunner(
        redis_url, fn, trig or trigger(), InProcessInvoker(handlers), consumer, block_ms=100, **kw
    )
