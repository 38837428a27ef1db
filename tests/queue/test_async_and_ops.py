"""Async invocations (result records, callbacks), DLQ replay/purge, stats and metrics, producer
validation — all against the real redis-server; callbacks go to a real loopback aiohttp server."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
from aiohttp import web
from hearth.queue.async_invoke import async_trigger, enqueue_invocation, get_invocation
from hearth.queue.dlq import list_dead, purge, replay, resolve_dlq
from hearth.queue.producer import emit_sync, handle_publish, publish
from hearth.queue.stats import (
    discover_triggers,
    register_queue_metrics,
    trigger_stats,
    trigger_stats_sync,
)
from hearth.queue.wire import InvalidPayload, InvalidStreamName, PayloadTooLarge
from prometheus_client import CollectorRegistry, generate_latest
from queue_helpers import runner, trigger, wait_for


def double(ev):
    return {"doubled": ev.json()["x"] * 2}


def boom(ev):
    raise RuntimeError("kaput")


@pytest.fixture
async def callback_server(monkeypatch):
    """A real HTTP server on loopback that records callbacks; fails the first one with 503.
    Loopback targets are refused unless allowed (hearth.queue.callbacks): allowed here."""
    monkeypatch.setenv("HEARTH_CALLBACK_ALLOW_NETS", "127.0.0.0/8")
    got: list[dict] = []
    state = {"fail_first": True}

    async def handle(request: web.Request) -> web.Response:
        if state["fail_first"]:
            state["fail_first"] = False
            return web.Response(status=503)
        got.append({"headers": dict(request.headers), "body": await request.read()})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner_ = web.AppRunner(app)
    await runner_.setup()
    site = web.TCPSite(runner_, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/hook", got
    await runner_.cleanup()


async def test_async_invocation_result_and_callback(redis_url, ar, callback_server):
    url, got = callback_server
    inv = await enqueue_invocation(
        ar, "dbl", b'{"x": 21}', "application/json", {"h": "v"}, callback_url=url, ttl=60
    )
    rec = await get_invocation(ar, inv)
    assert rec.status == "pending" and rec.function == "dbl"  # visible before any consumer runs
    rn = runner(
        redis_url,
        {"dbl": double},
        fn="dbl",
        trig=async_trigger("dbl", backoff_s=0.05),
        callback_backoff_s=0.05,
    )
    async with rn:
        await wait_for(lambda: got)  # delivered on the second try (first answered 503)
    rec = await get_invocation(ar, inv)
    assert rec.status == "succeeded" and rec.http_status == 200 and rec.attempts == 1
    assert json.loads(rec.body) == {"doubled": 42} and rec.content_type == "application/json"
    assert rec.callback == "delivered"
    assert 0 < await ar.ttl(f"hearth:result:{inv}") <= 60
    (cb,) = got
    assert (
        cb["headers"]["X-Hearth-Invocation-Id"] == inv
        and cb["headers"]["X-Hearth-Status"] == "succeeded"
    )
    assert json.loads(cb["body"]) == {"doubled": 42}


async def test_async_invocation_failure_is_stored_and_called_back(redis_url, ar, callback_server):
    url, got = callback_server
    inv = await enqueue_invocation(ar, "bad", b"", callback_url=url)
    rn = runner(
        redis_url,
        {"bad": boom},
        fn="bad",
        trig=async_trigger("bad", max_deliveries=2, backoff_s=0.05),
        callback_backoff_s=0.05,
    )
    async with rn:
        await wait_for(lambda: got)
    rec = await get_invocation(ar, inv)
    assert rec.status == "failed" and "RuntimeError: kaput" in rec.error and rec.attempts == 2
    assert (
        got[0]["headers"]["X-Hearth-Status"] == "failed"
        and "kaput" in got[0]["headers"]["X-Hearth-Error"]
    )
    assert await ar.xlen("hearth:fn:bad:async:dlq") == 1


async def test_unknown_invocation_and_bad_requests(ar):
    assert await get_invocation(ar, "nope") is None
    with pytest.raises(InvalidPayload, match="callback_url"):
        await enqueue_invocation(ar, "f", b"", callback_url="ftp://x")
    with pytest.raises(PayloadTooLarge, match="limit is 10 bytes"):
        await enqueue_invocation(ar, "f", b"x" * 11, max_bytes=10)
    with pytest.raises(InvalidPayload, match="not valid JSON"):
        await enqueue_invocation(ar, "f", b"{", "application/json")


async def test_publish_validation(ar):
    for bad in ["", "has space", "-dash", "hearth:fn:x:async", "orders:dlq", "x" * 300]:
        with pytest.raises(InvalidStreamName):
            await handle_publish(ar, bad, b"x", "text/plain")
    with pytest.raises(PayloadTooLarge) as e:
        await handle_publish(ar, "s", b"x" * 2000, "text/plain", max_bytes=1000)
    assert e.value.status == 413 and "2000 bytes" in str(e.value)
    with pytest.raises(InvalidPayload, match="not valid msgpack"):
        await handle_publish(ar, "s", b"\xc1", "application/msgpack")
    with pytest.raises(InvalidPayload, match="msgpack"):
        await publish(ar, "s", object())
    assert await ar.exists("s") == 0  # nothing written by rejected requests
    eid = await handle_publish(ar, "s", b'{"a": 1}', "application/json")
    ((eid2, f),) = await ar.xrange("s")
    assert eid2.decode() == eid and f[b"ct"] == b"application/json" and f[b"d"] == b'{"a": 1}'


def test_emit_sync_for_context_emit(redis_client):
    eid = emit_sync(redis_client, "out", {"k": [1, 2]}, {"tenant": "t1", "headers": {"a": "b"}})
    ((got, f),) = redis_client.xrange("out")
    assert got.decode() == eid
    assert msgpack.unpackb(f[b"d"]) == {"k": [1, 2]} and f[b"ct"] == b"application/msgpack"
    assert msgpack.unpackb(f[b"m"])["headers"] == {"a": "b", "tenant": "t1"}
    eid = emit_sync(redis_client, "out", "plain", {"content_type": "text/plain"})
    assert redis_client.xrange("out", min=eid, max=eid)[0][1][b"d"] == b"plain"


async def test_dlq_replay_delivers_again_and_purge(redis_url, ar, redis_client):
    fixed = {"on": False}
    seen = []

    def handler(ev):
        if not fixed["on"]:
            raise ValueError("downstream down")
        seen.append(ev.msgpack())

    for i in range(3):
        await publish(ar, "jobs", {"i": i})
    trig = trigger("jobs", max_deliveries=1)
    async with runner(redis_url, {"fn": handler}, trig=trig) as rn:
        await wait_for(lambda: rn.stats.dead_lettered == 3)
        assert resolve_dlq(redis_client, "fn") == "jobs:dlq"  # by function name via the registry
        dead = {d.preview(): d for d in list_dead(redis_client, "jobs:dlq")}  # any order
        assert sorted(dead) == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
        fixed["on"] = True
        one = dead['{"i": 1}'].id
        moved = replay(redis_client, "jobs:dlq", ids=[one])
        assert moved[0][0] == one
        await wait_for(lambda: seen == [{"i": 1}])
        replay(redis_client, "jobs:dlq")
        await wait_for(lambda: len(seen) == 3)
    assert sorted(x["i"] for x in seen) == [0, 1, 2]
    assert redis_client.xlen("jobs:dlq") == 0
    redis_client.xadd("jobs:dlq", {"error": "x"})
    assert purge(redis_client, "jobs:dlq") == 1 and redis_client.exists("jobs:dlq") == 0


async def test_stats_and_metrics(redis_url, ar, redis_client):
    release = asyncio.Event()

    async def handler(ev):
        if ev.msgpack() == "bad":
            raise ValueError("no")
        await release.wait()

    for i in range(6):
        await publish(ar, "metered", i)
    await publish(ar, "metered", "bad")
    trig = trigger("metered", max_inflight=2, max_deliveries=1, batch_size=1)
    rn = runner(redis_url, {"fn": handler}, trig=trig)
    async with rn:
        await wait_for(lambda: rn.inflight == 2)
        s = await trigger_stats(ar, "metered", "hearth-fn")
        assert (s.length, s.pending, s.lag, s.backlog) == (7, 2, 5, 7)
        release.set()
        await wait_for(lambda: rn.stats.acked == 6 and rn.stats.dead_lettered == 1)
    s = trigger_stats_sync(redis_client, "metered", "hearth-fn")
    assert (s.pending, s.lag, s.dead_letters, s.processed, s.backlog) == (0, 0, 1, 6, 0)
    await publish(ar, "unconsumed", 1)
    await ar.xgroup_create("unconsumed", "g2", id="0")
    refs = {(t.stream, t.group, t.function) for t in discover_triggers(redis_client)}
    assert ("metered", "hearth-fn", "fn") in refs and ("unconsumed", "g2", None) in refs
    reg = CollectorRegistry()
    register_queue_metrics(reg, redis_client)
    text = generate_latest(reg).decode()
    assert 'hearth_queue_dead_letters{function="fn",group="hearth-fn",stream="metered"} 1.0' in text
    assert 'hearth_queue_lag{function="",group="g2",stream="unconsumed"} 1.0' in text
    assert (
        'hearth_queue_processed_total{function="fn",group="hearth-fn",stream="metered"} 6.0' in text
    )


def test_discovers_triggers_declared_by_deployed_functions(redis_client):
    """`hearth queues` lists triggers of deployed functions even before a runner started."""
    from hearth.spec import parse_spec

    spec = parse_spec(
        {
            "name": "shop",
            "handler": "m:h",
            "triggers": [{"type": "redis-stream", "stream": "orders"}],
        }
    )
    redis_client.hset("hearth:functions", "shop", json.dumps(spec.to_dict()))
    refs = discover_triggers(redis_client, scan=False)
    assert [(t.stream, t.group, t.function, t.dlq) for t in refs] == [
        ("orders", "hearth-shop", "shop", "orders:dlq")
    ]
    (s,) = [trigger_stats_sync(redis_client, t.stream, t.group, t.dlq, t.function) for t in refs]
    assert (s.length, s.pending, s.lag, s.backlog) == (0, 0, 0, 0)


async def test_all_stats_async_for_the_controller(redis_url, ar, redis_client):
    from hearth.queue.stats import all_stats_async, forget_trigger
    from hearth.spec import parse_spec

    spec = parse_spec(
        {
            "name": "shop",
            "handler": "m:h",
            "triggers": [{"type": "redis-stream", "stream": "orders"}],
        }
    )
    redis_client.hset("hearth:functions", "shop", json.dumps(spec.to_dict()))
    for i in range(3):
        await publish(ar, "orders", i)
    (s,) = await all_stats_async(ar)
    assert (s.stream, s.function, s.lag, s.backlog) == (
        "orders",
        "shop",
        3,
        3,
    )  # no group yet: all lag
    async with runner(
        redis_url, {"shop": lambda ev: None}, fn="shop", trig=trigger("orders")
    ) as rn:
        await wait_for(lambda: rn.stats.acked == 3)
    (s,) = await all_stats_async(ar)
    assert (s.backlog, s.processed, s.consumers) == (0, 3, 1)
    await forget_trigger(ar, "orders", "hearth-shop")
    assert not await ar.hexists("hearth:queue:triggers", "orders hearth-shop")
