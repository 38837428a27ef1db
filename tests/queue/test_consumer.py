"""The stream trigger against a real redis-server: ack after success only, retries with backoff,
dead letters, reclaim from dead consumers, malformed entries, idempotency keys, graceful stop."""

from __future__ import annotations

import asyncio

import msgpack
from hearth.queue.consumer import StreamTriggerRunner
from hearth.queue.dlq import list_dead
from hearth.queue.inproc import InProcessInvoker
from hearth.queue.producer import publish
from hearth.sdk import HandlerError
from queue_helpers import runner, trigger, wait_for


async def test_ack_only_after_success(redis_url, ar, redis_client):
    started, release, seen = asyncio.Event(), asyncio.Event(), []

    async def slow(ev):
        seen.append(ev.msgpack())
        started.set()
        await release.wait()
        return {"ok": True}

    eid = await publish(ar, "events", {"n": 1})
    async with runner(redis_url, {"fn": slow}) as rn:
        await asyncio.wait_for(started.wait(), 10)
        # delivered to the handler but not finished: still pending, not acked
        assert (await ar.xpending("events", "hearth-fn"))["pending"] == 1
        release.set()
        await wait_for(lambda: rn.stats.acked == 1)
        assert (await ar.xpending("events", "hearth-fn"))["pending"] == 0
    assert seen == [{"n": 1}]
    assert rn.stats.delivered == 1 and rn.stats.dead_lettered == 0
    # the entry itself stays in the stream (acked, not deleted) and nothing went to the DLQ
    assert redis_client.xlen("events") == 1 and redis_client.xlen("events:dlq") == 0
    assert eid


async def test_idempotency_key_and_headers_visible_to_handler(redis_url, ar):
    got = []

    def handler(ev):
        got.append(
            (
                ev.context.idempotency_key,
                ev.headers.get("x-hearth-delivery"),
                ev.headers.get("tenant"),
                ev.data(),
            )
        )

    eid = await publish(
        ar, "events", b"raw-bytes", "application/octet-stream", {"headers": {"tenant": "acme"}}
    )
    async with runner(redis_url, {"fn": handler}) as rn:
        await wait_for(lambda: rn.stats.acked == 1)
    assert got == [(eid, "1", "acme", b"raw-bytes")]


async def test_failure_retried_with_backoff_then_dead_lettered(redis_url, ar, redis_client):
    attempts = []

    def handler(ev):
        attempts.append(
            (
                ev.context.idempotency_key,
                int(ev.headers["x-hearth-delivery"]),
                asyncio.get_event_loop().time(),
            )
        )
        raise ValueError(f"cannot handle {ev.msgpack()['n']}")

    eid = await publish(ar, "events", {"n": 7})
    trig = trigger(max_deliveries=3, backoff_s=0.2, backoff_max_s=1.0)
    async with runner(redis_url, {"fn": handler}, trig=trig) as rn:
        await wait_for(lambda: rn.stats.dead_lettered == 1)
    # three deliveries of the same entry, counted by the PEL (1, 2, 3), with growing delays
    assert [a[:2] for a in attempts] == [(eid, 1), (eid, 2), (eid, 3)]
    gaps = [b[2] - a[2] for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4
    # dead letter: error text, delivery count, original fields, function; original acked
    (dl,) = list_dead(redis_client, "events:dlq")
    assert dl.kind == "failed" and dl.deliveries == 3 and dl.function == "fn"
    assert "ValueError" in dl.error and "cannot handle 7" in dl.error
    assert dl.source_stream == "events" and dl.source_id == eid
    assert msgpack.unpackb(dl.fields[b"d"]) == {"n": 7}
    assert redis_client.xpending("events", "hearth-fn")["pending"] == 0


async def test_transient_failure_then_success_is_acked_once(redis_url, ar, redis_client):
    calls = []

    def flaky(ev):
        calls.append(ev.context.idempotency_key)
        if len(calls) < 2:
            raise HandlerError("try again", 503)
        return "done"

    await publish(ar, "events", {"x": 1})
    async with runner(redis_url, {"fn": flaky}) as rn:
        await wait_for(lambda: rn.stats.acked == 1)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert redis_client.xlen("events:dlq") == 0
    assert redis_client.xpending("events", "hearth-fn")["pending"] == 0


async def test_malformed_entries_go_to_dlq_with_reason_and_consumer_keeps_running(
    redis_url, ar, redis_client
):
    ok = []
    bad = {
        await ar.xadd("events", {"foo": "bar"}): "missing field 'd'",
        await ar.xadd(
            "events", {"d": b"\xc1\xff", "ct": "application/msgpack"}
        ): "'d' is not valid msgpack",
        await ar.xadd(
            "events", {"d": b"x", "ct": "text/plain", "m": b"\xc1"}
        ): "'m' (metadata) is not valid msgpack",
        await ar.xadd(
            "events", {"d": b"x", "ct": "text/plain", "m": msgpack.packb([1, 2])}
        ): "must be a msgpack map",
        await ar.xadd("events", {"v": "9", "d": msgpack.packb(1)}): "unsupported format version",
    }
    good = await publish(ar, "events", {"fine": True})
    async with runner(redis_url, {"fn": lambda ev: ok.append(ev.context.idempotency_key)}) as rn:
        await wait_for(lambda: rn.stats.acked == 1 and rn.stats.dead_lettered == 5)
    assert ok == [good]
    dead = {d.source_id: d for d in list_dead(redis_client, "events:dlq")}
    assert set(dead) == {k.decode() for k in bad}
    for k, reason in bad.items():
        d = dead[k.decode()]
        assert d.kind == "malformed" and reason in d.error, d.error
        assert d.deliveries == 1  # not retried: retrying cannot fix it
    assert dead[next(iter(bad)).decode()].fields == {b"foo": b"bar"}
    assert redis_client.xpending("events", "hearth-fn")["pending"] == 0


async def test_reclaims_entries_of_a_dead_consumer(redis_url, ar, redis_client):
    """A consumer read entries and died without acking; another runner takes them over after
    claim_idle_s, with the delivery count carried on."""
    await ar.xgroup_create("events", "hearth-fn", id="0", mkstream=True)
    ids = [await publish(ar, "events", {"i": i}) for i in range(5)]
    got = await ar.xreadgroup("hearth-fn", "dead-consumer", {"events": ">"}, count=3)
    taken = [e[0].decode() for e in got[0][1]]
    assert taken == ids[:3]
    seen = {}

    def handler(ev):
        seen[ev.context.idempotency_key] = int(ev.headers["x-hearth-delivery"])

    async with runner(
        redis_url, {"fn": handler}, trig=trigger(claim_idle_s=0.5), consumer="c2"
    ) as rn:
        await wait_for(lambda: rn.stats.acked == 5)
    assert set(seen) == set(ids)
    assert all(seen[i] == 2 for i in taken) and all(seen[i] == 1 for i in ids[3:])
    assert rn.stats.reclaimed == 3
    assert redis_client.xpending("events", "hearth-fn")["pending"] == 0


async def test_live_runner_keeps_slow_entries_from_being_stolen(redis_url, ar, redis_client):
    """Heartbeats: an invocation slower than claim_idle_s is not reclaimed by a second runner.
    Checked on the entry's own state in the PEL while it runs: it stays with `a`, delivered
    once, and never idle for claim_idle_s (any XAUTOCLAIM, even `a`'s own, would count a
    second delivery). Heartbeats come every claim_idle_s / 3 = 1 s, so only an event-loop stall
    of over 2 s could break it."""
    calls = []

    async def slow(ev):
        calls.append(ev.context.idempotency_key)
        await asyncio.sleep(6.0)  # twice claim_idle_s: without heartbeats it is taken over

    await publish(ar, "events", {"slow": 1})
    trig = trigger(claim_idle_s=3.0)
    seen = []
    async with runner(redis_url, {"fn": slow}, trig=trig, consumer="a") as a:
        await wait_for(lambda: calls)
        async with runner(redis_url, {"fn": slow}, trig=trig, consumer="b") as b:
            while a.stats.acked == 0:
                seen += await ar.xpending_range("events", "hearth-fn", "-", "+", 10)
                await asyncio.sleep(0.2)
    assert len(seen) >= 10
    assert {(r["consumer"], r["times_delivered"]) for r in seen} == {(b"a", 1)}
    assert max(r["time_since_delivered"] for r in seen) < 3000
    assert len(calls) == 1 and b.stats.reclaimed == 0


async def test_restart_with_same_consumer_name_resumes_its_pending(redis_url, ar):
    """Entries a previous run of this consumer left pending are re-delivered at start."""
    await ar.xgroup_create("events", "hearth-fn", id="0", mkstream=True)
    eid = await publish(ar, "events", {"i": 1})
    await ar.xreadgroup("hearth-fn", "c1", {"events": ">"}, count=1)
    seen = []
    trig = trigger(claim_idle_s=600)  # reclaim would take 10 minutes: this is the start-up recovery
    async with runner(
        redis_url,
        {
            "fn": lambda ev: seen.append(
                (ev.context.idempotency_key, ev.headers["x-hearth-delivery"])
            )
        },
        trig=trig,
    ) as rn:
        await wait_for(lambda: rn.stats.acked == 1)
    assert seen == [(eid, "2")]  # the same entry, delivered a second time


async def test_max_inflight_respected_and_graceful_stop_drains(redis_url, ar, redis_client):
    running, peak, done = 0, 0, []

    async def handler(ev):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done.append(ev.context.idempotency_key)

    ids = [await publish(ar, "events", i) for i in range(40)]
    rn = runner(redis_url, {"fn": handler}, trig=trigger(max_inflight=4, batch_size=10))
    await rn.start()
    await wait_for(lambda: len(done) >= 5)
    await rn.stop()  # in-flight ones finish and are acked; the rest stay for later
    assert peak <= 4
    pending = redis_client.xpending("events", "hearth-fn")["pending"]
    assert pending == 0, "stop must finish and ack what was in flight"
    # a new runner processes the remainder; every event handled, each exactly once here
    rn2 = runner(redis_url, {"fn": handler}, trig=trigger(max_inflight=4))
    async with rn2:
        await wait_for(lambda: len(done) == 40)
    assert sorted(done) == sorted(ids)


async def test_unknown_function_is_dead_lettered_with_status(redis_url, ar, redis_client):
    await publish(ar, "events", 1)
    rn = StreamTriggerRunner(
        redis_url, "ghost", trigger(max_deliveries=2), InProcessInvoker({}), "c1", block_ms=100
    )
    async with rn:
        await wait_for(lambda: rn.stats.dead_lettered == 1)
    (dl,) = list_dead(redis_client, "events:dlq")
    assert "404" in dl.error and "ghost" in dl.error and dl.deliveries == 2


class _OutageInvoker(InProcessInvoker):
    """The in-process invoker behind a platform that first cannot place the event: it answers
    the node agent's own errors (429 overloaded, 502 cold_start_failed) `outage` times."""

    def __init__(self, handlers, outage: int):
        super().__init__(handlers)
        self.outage = outage

    async def invoke(self, function, payload, **kw):
        from hearth.invoke import InvokeError, Overloaded

        if self.outage > 0:
            self.outage -= 1
            if self.outage % 2:
                raise Overloaded(function)
            raise InvokeError(502, "cold_start_failed", f"{function}: instance exited before ready")
        return await super().invoke(function, payload, **kw)


async def test_platform_outage_does_not_count_as_delivery(redis_url, ar, redis_client):
    """Attempts the platform could not place (overload, failed cold start) are retried but do
    not use up max_deliveries: a good event survives an outage longer than its retry budget."""
    seen = []
    inv = _OutageInvoker({"fn": lambda ev: seen.append(ev.headers["x-hearth-delivery"])}, outage=6)
    eid = await publish(ar, "events", {"k": 1})
    rn = StreamTriggerRunner(
        redis_url,
        "fn",
        trigger(max_deliveries=2, backoff_s=0.01, backoff_max_s=0.05),
        inv,
        "c1",
        block_ms=100,
    )
    async with rn:
        await wait_for(lambda: rn.stats.acked == 1)
    assert seen == ["1"] and rn.stats.failed == 6 and rn.stats.dead_lettered == 0
    assert redis_client.xlen("events:dlq") == 0 and eid
