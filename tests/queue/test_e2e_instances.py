"""End to end through real instance processes: a Hearth node (hearth.up.Platform: proxy daemon,
slot pool, node agent, queue service, gateway) runs in this event loop against the test Redis;
handlers run in instance processes started by the node agent; SIGKILL is a real kill -9."""

from __future__ import annotations

import json
import os
import signal

import aiohttp
import pytest
from hearth.config import Settings
from hearth.queue.examples import record_key
from hearth.queue.producer import build_fields, publish
from hearth.redis_server import free_port
from hearth.spec import FunctionSpec
from hearth.up import Platform
from queue_helpers import wait_for

TOKEN = "queue-e2e-token-0123456789"


def spec(name: str, handler: str, stream: str, env: dict | None = None, **trigger) -> FunctionSpec:
    t = {
        "type": "redis-stream",
        "stream": stream,
        "backoff_s": 0.1,
        "backoff_max_s": 0.5,
        "claim_idle_s": 2.0,
        **trigger,
    }
    return FunctionSpec.model_validate(
        {
            "name": name,
            "handler": f"hearth.queue.examples:{handler}",
            "triggers": [{"type": "http"}, t],
            "timeout_s": 60,
            "max_instances": 2,
            "concurrency": 2,
            "env": env or {},
        }
    )


@pytest.fixture
async def node(redis_url, tmp_path, monkeypatch):
    s = Settings(
        port=free_port(),
        redis_url=redis_url,
        state=tmp_path / "state",
        dataplane_mode="unix",
        admin_token=TOKEN,
    )
    p = Platform(
        s,
        deploy=[
            spec("rec", "record", "work", {"RECORD_REDIS_URL": redis_url}),
            spec("relay", "relay", "inbox"),
        ],
    )
    await p.start()
    yield p
    await p.stop()


async def _records(ar, stream: str) -> list[tuple[str, int, int]]:
    return [
        (e, int(pid), int(n))
        for e, pid, n in (x.decode().split() for x in await ar.lrange(record_key(stream), 0, -1))
    ]


async def test_stream_events_processed_by_instances_with_entry_id_as_key(node, ar):
    ids = [await publish(ar, "work", {"i": i}) for i in range(20)]
    await wait_for(lambda: _count(ar, "work", 20), timeout=60)
    recs = await _records(ar, "work")
    assert sorted(e for e, _, _ in recs) == sorted(ids)  # the handler saw the entry id as key
    assert all(pid != os.getpid() for _, pid, _ in recs)  # ran in instance processes
    await wait_for(lambda: _pending(ar, "work", "hearth-rec", 0), timeout=30)


async def test_sigkill_of_instance_mid_event_redelivers_and_loses_nothing(node, ar):
    victim = await publish(ar, "work", {"hang_first": True})
    others = [await publish(ar, "work", {"i": i}) for i in range(5)]
    started = await wait_for(lambda: ar.lrange(record_key("work") + ":started", 0, -1), timeout=60)
    eid, pid = started[0].decode().split()
    assert eid == victim
    os.kill(int(pid), signal.SIGKILL)  # the instance dies while processing the event
    await wait_for(lambda: _count(ar, "work", 6), timeout=60)
    recs = {e: (p, n) for e, p, n in await _records(ar, "work")}
    assert set(recs) == {victim, *others}  # nothing lost
    assert recs[victim][1] == 2 and recs[victim][0] != int(pid)  # redelivered to another instance
    await wait_for(lambda: _pending(ar, "work", "hearth-rec", 0), timeout=30)
    assert await ar.xlen("work:dlq") == 0


async def test_context_emit_chains_functions_through_a_stream(node, ar):
    await publish(ar, "inbox", {"to": "work", "payload": {"from": "relay"}})
    await wait_for(lambda: _count(ar, "work", 1), timeout=60)
    ((eid, f),) = await ar.xrange("work")
    assert json.loads(json.dumps(f[b"ct"].decode())) == "application/msgpack"
    (rec,) = await _records(ar, "work")
    assert rec[0] == eid.decode()


async def test_gateway_publish_route_feeds_the_trigger(node, ar):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        async with s.post(
            f"{node.url}/v1/streams/work:publish",
            data=b"\x81\xa1i\x01",
            headers={"Content-Type": "application/msgpack"},
        ) as resp:
            assert resp.status in (200, 201, 202), await resp.text()
            body = await resp.json()
        async with s.post(f"{node.url}/v1/streams/hearth:x:publish", data=b"1") as bad:
            assert bad.status == 400 or bad.status == 404
    await wait_for(lambda: _count(ar, "work", 1), timeout=60)
    (rec,) = await _records(ar, "work")
    assert rec[0] in json.dumps(body)


async def test_backlog_goes_in_batches_and_each_event_settles_alone(node, ar):
    """A backlog reaches instances in batches (one round trip for several events), yet each
    event is acked, retried or dead-lettered on its own: good ones once, failing ones to the DLQ."""
    await publish(ar, "work", {"i": -1})  # first event: the handler's speed gets measured
    await wait_for(lambda: _count(ar, "work", 1), timeout=60)
    data = [{"i": i, "fail": i % 20 == 7} for i in range(200)]
    pipe = ar.pipeline(transaction=False)  # all at once: a backlog, as a burst makes one
    for d in data:
        pipe.xadd("work", build_fields("work", d, None, None))
    ids = [e.decode() for e in await pipe.execute()]
    bad = {e for e, d in zip(ids, data, strict=True) if d["fail"]}
    await wait_for(lambda: _count(ar, "work", 1 + 200 - len(bad)), timeout=90)
    await wait_for(lambda: _dlq_len(ar, "work:dlq", len(bad)), timeout=90)
    await wait_for(lambda: _pending(ar, "work", "hearth-rec", 0), timeout=30)
    recs = [e for e, _, _ in await _records(ar, "work")]
    good = set(ids) - bad
    assert sorted(r for r in recs if r in good) == sorted(good)  # each good event exactly once
    dead = {f[b"source_id"].decode(): f for _e, f in await ar.xrange("work:dlq")}
    assert set(dead) == bad
    assert all(b"asked to fail" in f[b"error"] for f in dead.values())
    assert node.agent.metrics.batched_events.labels("rec")._value.get() > 0  # batches happened


async def _dlq_len(ar, stream: str, n: int) -> bool:
    return await ar.xlen(stream) >= n


async def _count(ar, stream: str, n: int) -> bool:
    return len({x.split()[0] for x in await ar.lrange(record_key(stream), 0, -1)}) >= n


async def _pending(ar, stream: str, group: str, n: int) -> bool:
    return (await ar.xpending(stream, group))["pending"] == n
