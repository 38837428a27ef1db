"""Redis restarting under a running trigger: it reconnects and nothing is lost. Uses its own
redis-server with an append-only file (a Redis without persistence loses the stream itself on
restart; docs/queues.md says to run it with appendonly)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis
from hearth.queue.producer import publish, publish_sync
from hearth.redis_server import RedisServer
from queue_helpers import runner, trigger, wait_for


@pytest.fixture
def persistent_redis(tmp_path):
    srv = RedisServer(tmp_path / "redis", persist=True).start()
    yield srv
    srv.stop()


async def test_redis_restart_during_consumption_loses_nothing(persistent_redis):
    url = persistent_redis.url
    r = redis.Redis.from_url(url)
    ids = [publish_sync(r, "orders", {"i": i}) for i in range(150)]
    processed: list[str] = []

    async def handler(ev):
        await asyncio.sleep(0.01)
        processed.append(ev.context.idempotency_key)

    rn = runner(
        url, {"fn": handler}, trig=trigger("orders", max_inflight=4, batch_size=4, claim_idle_s=2.0)
    )
    async with rn:
        await wait_for(lambda: len(processed) >= 20)
        await asyncio.to_thread(persistent_redis.restart)  # the server goes away and comes back
        r = redis.Redis.from_url(url)
        ids += [
            await asyncio.to_thread(publish_sync, r, "orders", {"i": 1000 + i}) for i in range(50)
        ]
        await wait_for(lambda: set(ids) <= set(processed), timeout=60)
        await wait_for(lambda: r.xpending("orders", "hearth-fn")["pending"] == 0, timeout=30)
    assert rn.stats.reconnects >= 1
    assert set(processed) == set(ids)  # nothing lost
    assert r.xlen("orders:dlq") == 0
    r.close()


async def test_runner_started_while_redis_is_down_waits_and_then_consumes(tmp_path):
    srv = RedisServer(tmp_path / "r2", persist=True).start()
    url = srv.url
    srv.stop()
    seen = []
    rn = runner(url, {"fn": lambda ev: seen.append(ev.msgpack())})
    await rn.start()
    try:
        await asyncio.sleep(0.5)  # reconnect attempts fail meanwhile; the runner must not die
        assert not rn.ready.is_set()
        await asyncio.to_thread(srv.start)
        r = redis.Redis.from_url(url)
        publish_sync(r, "events", "hello")
        await wait_for(lambda: seen == ["hello"], timeout=30)
        r.close()
    finally:
        await rn.stop()
        srv.stop()


async def test_sigkilled_consumer_process_mid_event_is_reclaimed_by_another(
    redis_url, ar, monkeypatch
):
    """A real worker process takes an event and is SIGKILLed while its handler runs; a second
    runner takes the entry over after claim_idle_s and finishes it (delivery 2)."""
    import subprocess
    import sys

    from hearth.queue.examples import record_key

    eid = await publish(ar, "jobs", {"hang_first": True})
    env = {**os.environ, "HEARTH_REDIS_URL": redis_url}
    cmd = [
        sys.executable,
        "-m",
        "hearth.queue.worker",
        "--stream",
        "jobs",
        "--function",
        "rec",
        "--handler",
        "hearth.queue.examples:record",
        "--consumer",
        "doomed",
        "--claim-idle-s",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started = await wait_for(
            lambda: ar.lrange(record_key("jobs") + ":started", 0, -1), timeout=60
        )
        assert started[0].decode().split()[0] == eid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    pend = await ar.xpending_range("jobs", "hearth-rec", "-", "+", 10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pend] == [(eid, "doomed")]
    from hearth.queue import examples

    monkeypatch.setenv("HEARTH_REDIS_URL", redis_url)  # the record handler runs in this process now
    monkeypatch.setattr(examples, "_r", None)
    record = examples.record

    rn = runner(
        redis_url,
        {"rec": record},
        fn="rec",
        trig=trigger("jobs", claim_idle_s=1.0),
        consumer="rescuer",
    )
    async with rn:
        done = await wait_for(lambda: ar.lrange(record_key("jobs"), 0, -1), timeout=30)
        await wait_for(lambda: rn.stats.acked == 1)
    got_eid, pid, delivery = done[0].decode().split()
    assert got_eid == eid and int(delivery) == 2 and int(pid) == os.getpid()
    assert (await ar.xpending("jobs", "hearth-rec"))["pending"] == 0


async def test_stream_deleted_under_the_runner_it_recovers(redis_url, ar):
    """The stream (and so its group) is deleted while an event is in flight: the ack fails with
    NOGROUP, the runner logs it, re-creates the group and keeps consuming."""
    release, seen = asyncio.Event(), []

    async def handler(ev):
        seen.append(ev.msgpack())
        if ev.msgpack() == "first":
            await release.wait()

    await publish(ar, "events", "first")
    async with runner(redis_url, {"fn": handler}) as rn:
        await wait_for(lambda: seen == ["first"])
        await ar.delete("events")
        release.set()
        await wait_for(lambda: rn.inflight == 0)
        await asyncio.sleep(0.3)  # the reader notices NOGROUP and re-creates the group
        await publish(ar, "events", "second")
        await wait_for(lambda: "second" in seen)
        await wait_for(lambda: rn.stats.acked >= 1)
    assert (await ar.xpending("events", "hearth-fn"))["pending"] == 0
