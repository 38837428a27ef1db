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

from hearth.queue.stats import find_group, group_backlog
from hearth.registry import LOAD_KEY


async def stream_backlog(
    r: aioredis.Redis, triggers: Mapping[str, Iterable[tuple[str, str]]]
) -> dict[str, tuple[int, int]]:
    """function -> (lag, pending) summed over its `(stream, group)` pairs, read in one round
    trip for every function (XLEN and XINFO GROUPS of each stream, pipelined)."""
    pairs = {name: list(ts) for name, ts in triggers.items()}
    streams = sorted({s for ts in pairs.values() for s, _ in ts})
    if not streams:
        return {}
    async with r.pipeline(transaction=False) as p:
        for s in streams:
            p.xlen(s)
            p.xinfo_groups(s)
        answers = await p.execute(raise_on_error=False)  # a stream not there yet: an error
    info = {}
    for i, s in enumerate(streams):
        length, groups = answers[2 * i], answers[2 * i + 1]
        info[s] = (
            length if isinstance(length, int) else 0,
            groups if isinstance(groups, list) else [],
        )
    out = {}
    for name, ts in pairs.items():
        lag = pending = 0
        for stream, group in ts:
            length, groups = info[stream]
            g_lag, g_pending = group_backlog(length, find_group(groups, group))
            lag, pending = lag + g_lag, pending + g_pending
        out[name] = (lag, pending)
    return out


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
    backlog = await stream_backlog(r, {n: triggers.get(n, ()) for n in functions})
    load = {}
    for name, fs in functions.items():
        lag, pending = backlog.get(name, (0, 0))
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
