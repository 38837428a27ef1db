"""A burst that the live instances drain before a new one could start starts none: the
request-path start is for queues a start would still find waiting (`start_helps`), judged by
how long a call holds its slot (`FunctionState.hold_s`, dispatch to reply). Driven step by
step on a real `InstanceTable` and `Admitter`, no processes; the hold time is measured by the
real invoker in `test_hold_time_is_measured_from_warm_calls_only` and the tests after it."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pytest
from hearth.agent.admitter import Admitter, start_helps
from hearth.agent.instance import ProcessInstance
from hearth.agent.table import InstanceTable
from hearth.config import Settings
from hearth.invoke import InvokeError, Overloaded
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

H = "hearth.functions.examples.handlers"
J = "application/json"


def _serving(
    hold_s: float | None, cold_start_s: float | None, concurrency: int = 4, queue_size: int = 100
):
    """One live instance of a function (concurrency 4 unless told), with the measured times
    given."""
    spec = parse_spec(
        {
            "name": "steady",
            "handler": "m:h",
            "concurrency": concurrency,
            "max_instances": 8,
            "queue_size": queue_size,
            "resources": {"memory_mb": 128, "cpu_millicores": 100},
        }
    )
    table = InstanceTable()
    fs = table.ensure(spec)
    inst = ProcessInstance(id="steady-1", eid=101, function="steady")
    table.started(inst)
    table.ready(inst, 60)
    table.adopt(fs, inst)
    fs.hold_s, fs.cold_start_s = hold_s, cold_start_s
    starts: list[str] = []

    def scale_out(f) -> None:  # what Lifecycle.begin_start counts in the same loop step
        f.starting += 1
        starts.append(f.spec.name)

    return table, fs, inst, Admitter(table, scale_out, lambda f, now: None), starts


async def _burst(adm: Admitter, fs, n: int) -> list[asyncio.Task]:
    calls = []
    for _ in range(n):
        deadline = asyncio.get_running_loop().time() + 60
        calls.append(asyncio.create_task(adm.acquire(fs, deadline)))
        await asyncio.sleep(0)
    return calls


async def test_a_burst_the_live_instance_drains_starts_nothing() -> None:
    # a no-op (a slot held 50 us, a start 80 ms): 6 calls at once on 4 slots, the 2 extra
    # ones wait microseconds for a slot; before, the 5th started a second instance
    table, fs, inst, adm, starts = _serving(50e-6, 0.08)
    calls = await _burst(adm, fs, 6)
    assert starts == [] and fs.starting == 0 and len(fs.waiters) == 2
    for _ in range(2):  # two calls finish: the waiters take their slots on the same instance
        table.done(inst)
        adm.wake(fs)
    got = await asyncio.gather(*calls)
    assert {i.id for i, _ in got} == {"steady-1"} and not any(cold for _, cold in got)
    assert starts == []


async def test_a_queue_a_start_would_still_find_waiting_starts_one() -> None:
    # a slot held 200 ms (a slow handler, or a starved CPU), a start 80 ms
    _, fs, _, adm, starts = _serving(0.2, 0.08)
    calls = await _burst(adm, fs, 5)
    assert starts == []  # (1 queued: 0.05 s < 0.08 s, the instance frees a slot first)
    calls += await _burst(adm, fs, 4)
    assert starts == ["steady"]  # (2-5 queued: 0.075 s, then 0.1 s > 0.08 s)
    for c in calls:
        c.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_unknown_times_start_as_before() -> None:
    _, fs, _, adm, starts = _serving(None, None)
    calls = await _burst(adm, fs, 5)
    assert starts == ["steady"]
    for c in calls:
        c.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


def test_start_helps() -> None:
    # waits past the start time or the wait bound start one; shorter waits do not
    assert not start_helps(0, 4, 50e-6, 0.08, None)
    assert not start_helps(100, 4, 50e-6, 0.08, 0.025)  # 1.3 ms
    assert start_helps(1, 4, 0.2, 0.08, None)  # 0.1 s > the start
    assert start_helps(0, 4, 0.2, None, 0.025)  # 0.05 s > the bound (no start measured yet)
    assert not start_helps(0, 4, 0.2, 1.0, 0.06)  # 0.05 s: under both
    # nothing to judge by: start
    assert start_helps(0, 4, None, 0.08, 0.025)
    assert start_helps(0, 4, 50e-6, None, None)
    assert start_helps(0, 0, 50e-6, 0.08, None)


async def _settle(calls: list[asyncio.Task]) -> None:
    for c in calls:
        c.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_a_deferred_start_still_rejects_at_queue_size() -> None:
    # every slot busy, a fast function (1 ms holds, a 0.3 s start): 100 calls at once. No start
    # helps (the queue drains in ms), so the calls wait, but only queue_size of them: the rest
    # hear 429 at once, as they would with no start allowed (before the fix: 100 queued)
    table, fs, inst, adm, starts = _serving(1e-3, 0.3, queue_size=10)
    for _ in range(4):
        assert table.take(fs) is inst
    calls = await _burst(adm, fs, 100)
    await asyncio.sleep(0)
    refused = [c for c in calls if c.done() and isinstance(c.exception(), Overloaded)]
    assert starts == [] and len(fs.waiters) == 10 and len(refused) == 90
    assert "queue_size 10" in str(refused[0].exception())
    got = adm.refusal(fs)  # the gateway's early 429 says the same
    assert isinstance(got, Overloaded) and "queue_size 10" in str(got)
    await _settle(calls)


async def test_a_call_stuck_longer_than_a_start_starts_one() -> None:
    # a concurrency-1 function that learnt 1 ms holds; its one call has held its slot for
    # 10 s: the next call does not wait behind it, it starts an instance (before: the 1 ms
    # average said a start would not help, and the caller waited out the stuck call)
    table, fs, inst, adm, starts = _serving(1e-3, 0.3, concurrency=1)
    assert table.take(fs) is inst
    fs.holding[b"stuck"] = (inst, time.monotonic() - 10.0)  # as `Invoker` books a dispatch
    calls = await _burst(adm, fs, 1)
    assert starts == ["steady"]
    await _settle(calls)


async def test_a_deferred_call_looks_again_when_a_start_would_be_ready() -> None:
    # the call in flight has only just started: the next one waits (a 1 ms function frees
    # its slot long before a 50 ms start), then looks again once a start would have been
    # ready; the call still holds its slot, so it starts one then (before: waited it out)
    table, fs, inst, adm, starts = _serving(1e-3, 0.05, concurrency=1)
    assert table.take(fs) is inst
    fs.holding[b"slow"] = (inst, time.monotonic())
    calls = await _burst(adm, fs, 1)
    assert starts == [] and len(fs.waiters) == 1
    for _ in range(500):  # bounded: each step is one loop pass or 10 ms
        if starts:
            break
        await asyncio.sleep(0.01)
    assert starts == ["steady"] and not calls[0].done()
    # the start's instance is handed to the waiter, which keeps its place in the queue
    assert list(fs.waiters) and len(fs.waiters) == 1
    await _settle(calls)


async def test_a_call_that_ended_no_longer_counts() -> None:
    # the in-flight bound is for calls still holding a slot on a live instance: once the
    # call ended (off the books) or its instance died, the learnt hold decides again
    _, fs, inst, _, _ = _serving(1e-3, 0.3)
    now = time.monotonic()
    fs.holding[b"a"] = (inst, now - 5.0)
    assert fs.expected_hold(now) == 5.0
    inst.state = "dead"
    assert fs.expected_hold(now) == 1e-3
    del fs.holding[b"a"]
    assert fs.expected_hold(now) == 1e-3
    fs.hold_s = None
    assert fs.expected_hold(now) is None  # nothing learnt: start as before


async def test_no_live_instance_starts_as_before() -> None:
    # a learnt fast hold never keeps a function with no live instance from starting one: the
    # call after the only instance died, and the first call of all
    table, fs, inst, adm, starts = _serving(1e-6, 10.0)
    table.dead(inst)
    calls = await _burst(adm, fs, 1)
    assert starts == ["steady"]
    await _settle(calls)
    table.remove("steady")
    fs = table.ensure(fs.spec)  # served, never started: no instance at all
    fs.hold_s, fs.cold_start_s = 1e-6, 10.0
    calls = await _burst(adm, fs, 1)
    assert starts == ["steady", "steady"]
    await _settle(calls)


@pytest.fixture
async def platform(redis_url):
    s = Settings.from_env(port=free_port(), redis_url=redis_url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-hold-"))
    s.admin_token = "test-token-123456"
    async with Platform(s, warm_pool_size=0) as p:
        yield p


async def test_hold_time_is_measured_from_warm_calls_only(platform) -> None:
    """The real invoker measures how long a call holds its slot (both call paths end in
    `Invoker._ended`, where it is taken): a cold call adds no sample (its time may include
    the boot), a warm one is a sample weighted 0.2, and a 0.2 s handler's is >= 0.2 s. No
    upper bound is asserted: a loaded machine only makes samples longer."""
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "nap", "handler": f"{H}:sleep", "concurrency": 2}))
    fs = agent.functions["nap"]
    cold = await agent.invoke("nap", b'{"seconds": 0}', content_type=J)
    assert cold.status == 200 and cold.cold and fs.hold_s is None and not fs.holding
    assert (await agent.invoke("nap", b'{"seconds": 0}', content_type=J)).status == 200
    first = fs.hold_s
    assert first is not None and first > 0 and not fs.holding  # the first sample is the mean
    assert (await agent.invoke("nap", b'{"seconds": 0.2}', content_type=J)).status == 200
    assert fs.hold_s >= 0.8 * first + 0.2 * 0.2 and not fs.holding


async def test_errors_and_timeouts_are_holds_too(platform) -> None:
    """A call that fails or times out held its slot as long as it ran: its time is a sample
    (before: only successful replies were, and a function whose calls hang kept its 1 ms)."""
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "sad", "handler": f"{H}:triage", "concurrency": 2}))
    await agent.deploy(parse_spec({"name": "nod", "handler": f"{H}:sleep", "timeout_s": 5}))
    sad, nod = agent.functions["sad"], agent.functions["nod"]
    await agent.invoke("sad", b"ok", content_type=J)  # cold: no sample
    assert sad.hold_s is None
    assert (await agent.invoke("sad", b"raise", content_type=J)).status == 500
    assert sad.hold_s is not None and not sad.holding
    await agent.invoke("nod", b'{"seconds": 0}', content_type=J)  # cold
    await agent.invoke("nod", b'{"seconds": 0}', content_type=J)
    learnt = nod.hold_s
    assert learnt is not None
    with pytest.raises(InvokeError) as e:
        await agent.invoke("nod", b'{"seconds": 1}', content_type=J, timeout=0.3)
    assert e.value.status == 504
    assert nod.hold_s >= 0.8 * learnt + 0.2 * 0.3 and not nod.holding
    # a caller that leaves mid-call takes its call off the books (no sample: it has no end)
    for _ in range(500):  # (the abandoned call still runs: until its slot is free again)
        if not any(i.inflight for i in nod.live()):
            break
        await asyncio.sleep(0.01)
    after = nod.hold_s
    gone = asyncio.create_task(agent.invoke("nod", b'{"seconds": 1}', content_type=J))
    for _ in range(500):
        if nod.holding:
            break
        await asyncio.sleep(0.01)
    assert nod.holding
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert not nod.holding and nod.hold_s == after


async def test_a_real_stuck_call_does_not_hold_up_the_next(platform) -> None:
    """End to end: a concurrency-1 function learns short holds; one call then sleeps 20 s.
    Once it has held its slot longer than a start takes, the next call starts a second
    instance at once and is served by it (before: it queued behind the stuck call, the learnt
    1 ms saying a start would not help, until the autoscaler's tick saw the queue and started
    one: that call is not cold)."""
    agent = platform.agent
    spec = {"name": "one", "handler": f"{H}:sleep", "concurrency": 1, "timeout_s": 30}
    await agent.deploy(parse_spec(spec))
    fs = agent.functions["one"]
    for _ in range(4):  # a cold call, then warm ones: hold_s and cold_start_s learnt
        assert (await agent.invoke("one", b'{"seconds": 0}', content_type=J)).status == 200
    assert fs.hold_s is not None and fs.cold_start_s is not None
    stuck = asyncio.create_task(agent.invoke("one", b'{"seconds": 20}', content_type=J))
    for _ in range(1000):  # until it has held the slot longer than a start takes (bounded)
        held = [since for _, since in fs.holding.values()]
        if held and time.monotonic() - held[0] > fs.cold_start_s:
            break
        await asyncio.sleep(0.01)
    assert fs.holding and len(fs.live()) == 1
    busy = next(iter(fs.holding.values()))[0]
    try:
        nxt = await asyncio.wait_for(
            agent.invoke("one", b'{"seconds": 0}', content_type=J), timeout=15
        )
        # cold: this call started the instance on the request path (the autoscaler's tick
        # also starts one for a queue that stays, later; the call it serves is not cold)
        assert nxt.status == 200 and nxt.cold and not stuck.done() and len(fs.live()) == 2
    finally:
        busy.kill()  # (its caller hears 502; the platform need not wait 20 s for it to stop)
        await asyncio.gather(stuck, return_exceptions=True)
