"""A burst that the live instances drain before a new one could start starts none: the
request-path start is for queues a start would still find waiting (`start_helps`), judged by
how long a call holds its slot (`FunctionState.hold_s`, dispatch to reply). Driven step by
step on a real `InstanceTable` and `Admitter`, no processes; the hold time is measured by the
real invoker in `test_hold_time_is_measured_dispatch_to_reply`."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hearth.agent.admitter import Admitter, start_helps
from hearth.agent.instance import ProcessInstance
from hearth.agent.table import InstanceTable
from hearth.config import Settings
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

H = "hearth.functions.examples.handlers"
J = "application/json"


def _serving(hold_s: float | None, cold_start_s: float | None):
    """One live instance of a concurrency-4 function, with the measured times given."""
    spec = parse_spec(
        {
            "name": "steady",
            "handler": "m:h",
            "concurrency": 4,
            "max_instances": 8,
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


@pytest.fixture
async def platform(redis_url):
    s = Settings.from_env(port=free_port(), redis_url=redis_url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-hold-"))
    s.admin_token = "test-token-123456"
    async with Platform(s, warm_pool_size=0) as p:
        yield p


async def test_hold_time_is_measured_dispatch_to_reply(platform) -> None:
    """The real invoker measures how long a call holds its slot: a handler sleeping 0.2 s
    holds it at least that long (both call paths end in `Invoker._ended`, where it is taken)."""
    agent = platform.agent
    await agent.deploy(parse_spec({"name": "nap", "handler": f"{H}:sleep", "concurrency": 2}))
    fs = agent.functions["nap"]
    assert (
        await agent.invoke("nap", b'{"seconds": 0}', content_type=J)
    ).status == 200  # cold: started, served
    assert fs.hold_s is not None and fs.hold_s < 0.2
    before = fs.hold_s
    assert (await agent.invoke("nap", b'{"seconds": 0.2}', content_type=J)).status == 200
    assert fs.hold_s >= 0.8 * before + 0.2 * 0.2  # a sample of >= 0.2 s, weighted 0.2
