"""Queue lag of stream triggers in the published load: the agent's publisher reads its triggers'
consumer groups on a real Redis (lag = entries not yet delivered, pending = delivered, not
acked), the controller's `LoadReader` counts a group once however many nodes report it, and the
decision core scales on lag like on held requests (a stream-triggered function at zero starts)."""

from __future__ import annotations

import asyncio
import collections
import json
import time

import redis
import redis.asyncio as aioredis
from hearth.agent.loadpub import function_load, publish
from hearth.agent.table import FunctionState
from hearth.controller.decide import DecisionCore
from hearth.controller.k8s import KubernetesController
from hearth.controller.k8s.pods import LABEL_FUNCTION
from hearth.controller.k8s.registry_sync import LoadReader
from hearth.controller.model import FunctionLoad, Node, Observation, Start
from hearth.registry import LOAD_KEY
from hearth.spec import parse_spec
from k8s_client import create_function

SPEC = {
    "name": "orders",
    "handler": "m:h",
    "concurrency": 2,
    "max_instances": 10,
    "triggers": [{"type": "redis-stream", "stream": "orders-in"}],
}
NODES = [Node("n0", 16000, 16384)]


def starts(core, load, now, instances=()):
    spec = parse_spec(SPEC)
    obs = Observation(now, NODES, list(instances), {"orders": spec}, {"orders": load})
    return [a for a in core.decide(obs) if isinstance(a, Start)]


def test_core_scales_on_stream_lag_not_on_pending():
    core = DecisionCore(stable_window_s=10, panic_window_s=2, scale_to_zero_grace_s=0)
    # 7 undelivered entries at concurrency 2: 4 instances from zero, like 7 held requests
    assert len(starts(core, FunctionLoad("orders", stream_lag=7), 100.0)) == 4
    # delivered but unacked entries are running (in flight) or waiting out a retry: not added
    core2 = DecisionCore(stable_window_s=10, panic_window_s=2, scale_to_zero_grace_s=0)
    assert starts(core2, FunctionLoad("orders", stream_pending=5), 100.0) == []
    # the same lag as held requests decides the same
    core3 = DecisionCore(stable_window_s=10, panic_window_s=2, scale_to_zero_grace_s=0)
    assert len(starts(core3, FunctionLoad("orders", queued=7), 100.0)) == 4
    # lag beyond what max_instances serve: capped
    core4 = DecisionCore(stable_window_s=10, panic_window_s=2, scale_to_zero_grace_s=0)
    assert len(starts(core4, FunctionLoad("orders", stream_lag=500), 100.0)) == 10


def _state(waiting: int) -> FunctionState:
    return FunctionState(
        spec=parse_spec(SPEC), waiters=collections.deque(object() for _ in range(waiting))
    )


def test_publisher_reports_group_lag_and_the_reader_counts_it_once(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create("orders-in", "hearth-orders", id="0", mkstream=True)
    for i in range(5):
        r.xadd("orders-in", {"n": i})
    r.xreadgroup("hearth-orders", "node-a-orders", {"orders-in": ">"}, count=2)  # 2 pending

    async def go():
        ar = aioredis.Redis.from_url(redis_url)
        try:
            trig = {"orders": [("orders-in", "hearth-orders")]}
            a = await publish(ar, "node-a", {"orders": _state(1)}, trig)
            await publish(ar, "node-b", {"orders": _state(1)}, trig)
            return a
        finally:
            await ar.aclose()

    written = json.loads(asyncio.run(go())["orders"])
    assert (written["lag"], written["pending"], written["queued"]) == (3, 2, 1)
    assert 0 < r.ttl("hearth:load:node-a") <= 10
    ld = LoadReader(redis_url, max_age_s=0)("orders")
    # held requests add up over nodes; the shared group's lag and pending count once
    assert (ld.queued, ld.stream_lag, ld.stream_pending) == (2, 3, 2)

    r.close()


def test_publisher_reads_every_trigger_in_one_round_trip(redis_url):
    """XLEN and XINFO GROUPS per stream, pipelined: none of `trigger_stats`' other reads (DLQ
    length, rate keys, acked count), a stream not created yet counts nothing, and a stream whose
    acked entries are deleted (the async stream) still gives its lag."""
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create("s0", "g", id="0", mkstream=True)
    ids = [r.xadd("s0", {"n": i}) for i in range(4)]
    r.xreadgroup("g", "c", {"s0": ">"}, count=2)
    r.xack("s0", "g", ids[0])
    r.xdel("s0", ids[0])  # XINFO's lag is unknown after XDEL: bounded by XLEN - entries-read
    trig = {f"f{i}": [("s0", "g"), (f"none-{i}", "g")] for i in range(10)}
    r.config_resetstat()

    async def go():
        ar = aioredis.Redis.from_url(redis_url)
        try:
            return await publish(ar, "n", {n: _state(0) for n in trig}, trig)
        finally:
            await ar.aclose()

    load = {n: json.loads(v) for n, v in asyncio.run(go()).items()}
    assert {(v["lag"], v["pending"]) for v in load.values()} == {(2, 1)}
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}
    assert calls.get("xinfo|groups") == 11 and calls.get("xlen") == 11  # once per stream
    assert not {"mget", "hget", "exists"} & calls.keys()
    r.close()


def test_the_controller_scales_from_zero_on_stream_lag(redis_client, redis_url, emu, api):
    # what an agent publishes: 2 held requests, 3 undelivered entries
    redis_client.hset(LOAD_KEY + ":node-a", "orders", function_load(0, 2, 3, 0, time.time()))
    create_function(api, "orders", {k: v for k, v in SPEC.items() if k != "name"})
    reader = LoadReader(redis_url, max_age_s=0)
    c = KubernetesController(api, "default", core=DecisionCore(), loads=reader)
    c.reconcile_once()
    mine = [
        p
        for p in emu.objects("pods").values()
        if p["metadata"]["labels"].get(LABEL_FUNCTION) == "orders"
    ]
    assert len(mine) == 3  # ceil((2 held + 3 undelivered) / concurrency 2)
    reader.close()
