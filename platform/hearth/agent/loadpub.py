"""The per-function load a node agent publishes for the controller's autoscaler.

Every second each agent writes `hearth:load:<node>` (a hash: function -> JSON), expiring after
`ttl_s` so a dead node's load vanishes:
  inflight  invocations running on this node's instances
  queued    invocations held for an instance on this node (a request at zero: the activator)
  lag       entries of the function's stream triggers not yet delivered to its consumer group
            (summed over its triggers, including its async-invocation stream)
  pending   entries delivered to the group and not acked yet (running, or awaiting a retry)
`lag` and `pending` belong to the consumer group, which every node shares: the controller takes
the largest report (`LoadReader`), not the sum. It scales on inflight + queued + lag (pending
entries are already running, counted in inflight, or waiting out a retry backoff).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis

from hearth.queue.stats import trigger_stats
from hearth.registry import LOAD_KEY


async def stream_backlog(r: aioredis.Redis, triggers: Iterable[tuple[str, str]]) -> tuple[int, int]:
    """(lag, pending) summed over `(stream, group)` pairs, read from Redis (XINFO GROUPS)."""
    lag = pending = 0
    for stream, group in triggers:
        st = await trigger_stats(r, stream, group)
        lag += st.lag
        pending += st.pending
    return lag, pending


def function_load(inflight: int, queued: int, lag: int, pending: int, now: float) -> str:
    return json.dumps(
        {"inflight": inflight, "queued": queued, "lag": lag, "pending": pending, "t": now}
    )


async def publish(
    r: aioredis.Redis,
    node: str,
    functions: Mapping[str, Any],
    triggers: Mapping[str, Iterable[tuple[str, str]]],
    ttl_s: int = 10,
) -> dict[str, str]:
    """Write this node's load (`functions`: name -> FunctionState; `triggers`: name -> its
    (stream, group) pairs) and return what was written."""
    now = time.time()
    load = {}
    for name, fs in functions.items():
        lag, pending = await stream_backlog(r, triggers.get(name, ()))
        load[name] = function_load(
            sum(i.inflight for i in fs.instances.values()), len(fs.waiters), lag, pending, now
        )
    key = f"{LOAD_KEY}:{node}"
    async with r.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        if load:
            pipe.hset(key, mapping=load)
            pipe.expire(key, ttl_s)
        await pipe.execute()
    return load
