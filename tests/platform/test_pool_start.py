"""A warm-pool start begins in the admitter's call (#19): the pool instance is sent its spec
before `Lifecycle.begin_start` returns, so its import starts a loop pass sooner than from the
start's task; whatever has to wait (a zygote coming up, placement that must evict) is left to
the task. Driven step by step on the real `Lifecycle`, `InstanceTable`, `Admitter` and
cold-start log; the runner records what it is asked (no processes)."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest
from hearth.agent.admitter import Admitter
from hearth.agent.coldstarts import ColdStartLog
from hearth.agent.deadlines import expire
from hearth.agent.instance import ProcessInstance
from hearth.agent.lifecycle import Lifecycle
from hearth.agent.runner import ProcessRunner
from hearth.agent.table import InstanceTable
from hearth.controller.keepalive import PolicySet
from hearth.controller.model import Node
from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import PoolExhausted
from hearth.invoke import InvokeError
from hearth.metrics import Metrics
from hearth.runtime.instance import write_slot
from hearth.spec import parse_spec


class Recorder:
    """The runner's side of a start, recorded: which pool instances were sent a spec, and
    whether `fork_now` asks the start to wait for a zygote (None) or fork from one."""

    def __init__(
        self, fork: tuple[bool, dict[str, Any]] | None = (False, {}), full: bool = False
    ) -> None:
        self.fork = fork
        self.full = full  # the spec cannot be written: the slot pool is full
        self.specialised: list[str] = []
        self.held: list[bool] = []  # whether each spec waits for the request handed over

    def fork_now(self, spec: Any) -> tuple[bool, dict[str, Any]] | None:
        return self.fork

    async def fork_preloaded(self, spec: Any) -> tuple[bool, dict[str, Any]]:
        await asyncio.sleep(0)  # a wait for a zygote that then came up too late
        return False, {"zygote_fallback": "waited"}

    def specialise(self, inst: Any, spec: Any, hold: bool = False) -> float:
        if self.full:
            raise PoolExhausted("no free slot of 256 bytes or more")
        self.specialised.append(inst.id)
        self.held.append(hold)
        return 1.0

    def specialise_with(self, inst: Any, spec: Any, request: Any) -> tuple[float, list[Any]]:
        self.specialise(inst, spec)
        return 1.0, []

    def kill(self, inst: Any) -> bool:
        return False


def _setup(runner: Recorder, node_mb: int = 8192) -> tuple[Lifecycle, Any, ProcessInstance]:
    spec = parse_spec(
        {"name": "f", "handler": "m:h", "resources": {"memory_mb": 256, "cpu_millicores": 100}}
    )
    table = InstanceTable()
    life = Lifecycle(
        pool=None,  # type: ignore[arg-type]
        table=table,
        link=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        coldstarts=ColdStartLog(Metrics()),
        nodes=[Node(name="n", cpu_millicores=8000, memory_mb=node_mb)],
        policies=PolicySet(),
    )
    life.runner = runner  # type: ignore[assignment]
    life.admitter = Admitter(table, life.begin_start, lambda f, now: None)
    pooled = ProcessInstance(id="pool-1", eid=7, function=None, node="n")
    table.started(pooled)
    table.add_pooled(pooled)
    table.pooled_ready(pooled, {})
    return life, table.ensure(spec), pooled


async def test_the_pool_instance_is_sent_its_spec_in_the_admitters_call() -> None:
    runner = Recorder()
    life, fs, pooled = _setup(runner)
    call = asyncio.get_running_loop().create_task(
        life.admitter.acquire(fs, asyncio.get_running_loop().time() + 60)
    )
    await asyncio.sleep(0)  # one step of the call: it asks for a start and waits for it
    # the spec left in that step: the start's task has not run yet
    assert runner.specialised == ["pool-1"]
    assert fs.starting == 1 and life.table.pooled == {} and pooled.state == "starting"
    for _ in range(5):  # the start's task: the waiting call is handed the instance, before
        await asyncio.sleep(0)  # the instance reports ready (its request goes ahead)
    assert call.done() and call.result() == (pooled, True)
    pooled.ready.set_result({"code_import_start": 2.0, "code_imported": 3.0, "ready": 4.0})
    for _ in range(5):
        await asyncio.sleep(0)
    assert fs.starting == 0 and fs.instances == {"pool-1": pooled}
    # its record waits for the answer of the call handed to it (test_pool_start_record.py)
    assert life.coldstarts.records == [] and pooled.after_answer is not None
    life.done(pooled)  # that call's reply
    for _ in range(2):
        await asyncio.sleep(0)
    (rec,) = life.coldstarts.records
    assert rec["from_pool"] and rec["phases"]["spawned"] == 1.0
    assert runner.specialised == ["pool-1"]  # sent once


async def test_the_call_that_starts_a_pool_instance_is_handed_it_in_the_same_step() -> None:
    """The call's request can follow its spec at once (one message: the spec is held for it):
    the call has its instance without waiting for the start's task, claimed (in flight)."""
    runner = Recorder()
    life, fs, pooled = _setup(runner)
    got = await life.admitter.acquire(fs, asyncio.get_running_loop().time() + 60)
    assert got == (pooled, True) and runner.held == [True]
    assert pooled.inflight == 1 and not fs.waiters
    second = asyncio.get_running_loop().create_task(
        life.admitter.acquire(fs, asyncio.get_running_loop().time() + 60)
    )
    for _ in range(5):  # the start's task does not hand it over again, to the next call
        await asyncio.sleep(0)
    assert pooled.inflight == 1 and not second.done() and len(fs.waiters) == 1
    second.cancel()


async def test_a_start_nobody_waits_for_sends_its_spec_at_once() -> None:
    runner = Recorder()
    life, fs, pooled = _setup(runner)
    life.begin_start(fs)  # (a min-instances start: no call waits)
    assert runner.specialised == ["pool-1"] and runner.held == [False]
    call = asyncio.get_running_loop().create_task(
        life.admitter.acquire(fs, asyncio.get_running_loop().time() + 60)
    )
    pooled.ready.set_result({})
    for _ in range(5):  # a call that came meanwhile takes it once it is ready
        await asyncio.sleep(0)
    assert call.done() and call.result() == (pooled, False) and pooled.inflight == 1


async def test_a_start_that_waits_for_a_zygote_is_left_to_its_task() -> None:
    runner = Recorder(fork=None)  # the built-ins' zygote is still starting: fork_now can't say
    life, fs, pooled = _setup(runner)
    life.begin_start(fs)
    assert runner.specialised == []  # nothing sent in the call
    for _ in range(3):
        await asyncio.sleep(0)
    assert runner.specialised == ["pool-1"]  # the task waited, then took the pool
    pooled.ready.set_result({})
    for _ in range(5):
        await asyncio.sleep(0)
    assert life.coldstarts.records[0]["zygote_fallback"] == "waited"


async def test_a_start_that_forks_from_a_zygote_takes_no_pool_instance_in_the_call() -> None:
    runner = Recorder(fork=(True, {}))
    life, fs, pooled = _setup(runner)
    task = life.begin_start(fs)
    assert runner.specialised == [] and life.table.pooled == {"pool-1": pooled}
    task.cancel()


async def test_a_start_that_does_not_fit_is_left_to_placement() -> None:
    runner = Recorder()
    life, fs, pooled = _setup(runner, node_mb=300)  # the pool instance's 128 + 256 > 300
    task = life.begin_start(fs)
    assert runner.specialised == [] and pooled.state == "pooled"  # placement evicts: its task
    task.cancel()


async def test_a_spec_is_held_only_for_a_live_waiter() -> None:
    """A waiter that is done (cancelled, timed out) gets no instance: the spec is not held for
    a request that will not follow."""
    runner = Recorder()
    life, fs, pooled = _setup(runner)
    gone = asyncio.get_running_loop().create_future()
    gone.cancel()
    fs.waiters.append(gone)
    life.begin_start(fs)
    assert runner.specialised == ["pool-1"] and runner.held == [False]
    assert pooled.inflight == 0  # handed to nobody
    pooled.ready.set_result({})
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_spec_that_cannot_be_written_leaves_the_pool_instance_free() -> None:
    """The slot pool is full: the waiting call hears why (no hang; 429 no_space, as a request
    whose payload finds the pool full) and the pool instance is still a free pool instance, not
    one counted "starting" forever with nothing sent."""
    runner = Recorder(full=True)
    life, fs, pooled = _setup(runner)
    call = asyncio.get_running_loop().create_task(
        life.admitter.acquire(fs, asyncio.get_running_loop().time() + 60)
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert call.done() and "no free slot" in str(call.exception())
    # the same answer a request gets when its payload finds the pool full: back-pressure
    assert (call.exception().status, call.exception().error) == (429, "no_space")
    assert pooled.state == "pooled" and pooled.inflight == 0 and pooled.ready is None
    assert life.table.free_pooled("n") is pooled and fs.starting == 0
    runner.full = False  # room again: the next call's start takes it
    again = asyncio.get_running_loop().create_task(
        life.admitter.acquire(fs, asyncio.get_running_loop().time() + 60)
    )
    for _ in range(3):
        await asyncio.sleep(0)
    assert again.done() and again.result() == (pooled, True) and runner.specialised == ["pool-1"]


class _Link:
    """What `Lifecycle.exited` asks of the link: nothing was in flight here."""

    async def fail_pending(self, inst: Any, rc: int) -> None:
        return None


def _with_spec_slot(life: Lifecycle, pooled: ProcessInstance) -> tuple[SlotPool, int, int]:
    """A real slot pool on `life`, and a spec slot written for `pooled` (as the runner does)."""
    pool = SlotPool.create(f"hearth-pst-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    life.pool = pool
    slot, _, _ = write_slot(pool, {"spec": {"name": "f"}}, b"")
    pooled.spec_slot = (slot.index, slot.gen)
    return pool, slot.index, slot.gen


async def test_the_agent_frees_a_spec_slot_at_the_instances_report() -> None:
    """The pool instance only reads its spec (no pool lock before its import): the agent frees
    the slot when the instance's first report says it has read it, ready or failed."""
    for report in (
        {"type": "ready", "phases": {}, "spec_read": True},
        {"type": "failed", "error": "boom", "spec_read": True},
    ):
        life, fs, pooled = _setup(Recorder())
        pool, index, gen = _with_spec_slot(life, pooled)
        try:
            life.begin_start(fs)
            assert pool.owner(index, gen) is not None  # sent, not read yet: still in use
            life.reported(pooled.eid, report)
            assert pool.owner(index, gen) is None and pooled.spec_slot is None
            life.reported(pooled.eid, report)  # a second report frees nothing twice
            for _ in range(5):
                await asyncio.sleep(0)
        finally:
            pool.destroy()


async def test_the_agent_frees_a_spec_slot_at_the_exit_unless_a_report_said_it_was_read() -> None:
    """An instance that dies before its report (killed during its import) never frees the
    spec slot, and the slot is the agent's, whom `reclaim_dead` never frees: the exit does.
    So too when a request overtook the spec: the instance reports that it failed without
    reading its spec, still on its way (`spec_read` absent); freed at that report, the slot
    could be taken by another sender while the instance still reads it."""
    for report in (None, {"type": "failed", "error": "carried no spec"}):
        life, fs, pooled = _setup(Recorder())
        life.link = _Link()  # type: ignore[assignment]
        pool, index, gen = _with_spec_slot(life, pooled)
        try:
            task = life.begin_start(fs)
            if report is not None:
                life.reported(pooled.eid, report)
                assert pool.owner(index, gen) is not None and pooled.spec_slot == (index, gen)
            await life.exited(pooled, -9)
            assert pool.owner(index, gen) is None and pooled.spec_slot is None
            for _ in range(5):
                await asyncio.sleep(0)
            assert task.done()
        finally:
            pool.destroy()


class _FailingLink:
    """A data-plane link on a real slot pool whose sends fail (the proxy connection lost)."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool

    def post(self, d: Any) -> None:
        raise OSError("proxy connection lost")

    hold = post

    def send_pair(self, first: Any, then: Any) -> list[Any]:
        raise OSError("proxy connection lost")


def test_a_spec_that_cannot_be_sent_frees_its_slot() -> None:
    """The spec is written, then its send fails: the runner frees the slot and forgets it (the
    instance is still a free pool instance; its next spec would overwrite `spec_slot`, and the
    slot is the agent's, which `reclaim_dead` never frees)."""
    pool = SlotPool.create(f"hearth-pst-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        runner = ProcessRunner(
            _FailingLink(pool),  # type: ignore[arg-type]
            pool_name=pool.name,
            proxy_socket="",
            log_dir=None,
            on_started=lambda inst: None,
            on_exit=None,  # type: ignore[arg-type]
        )
        spec = parse_spec({"name": "f", "handler": "m:h"})
        for hold in (False, True):
            pooled = ProcessInstance(id="pool-1", eid=7, function=None, node="n")
            with pytest.raises(OSError, match="proxy connection lost"):
                runner.specialise(pooled, spec, hold)
            assert pooled.spec_slot is None
            assert pool.stats()["used"] == 0
        # the same when it leaves with a request (a pool start from the read: `specialise_with`)
        pooled = ProcessInstance(id="pool-1", eid=7, function=None, node="n")
        request = Descriptor(dst=7, src=0, kind=Kind.INVOKE)
        with pytest.raises(OSError, match="proxy connection lost"):
            runner.specialise_with(pooled, spec, request)
        assert pooled.spec_slot is None
        assert pool.stats()["used"] == 0
    finally:
        pool.destroy()


def test_the_one_node_fit_adds_up_what_the_table_holds_on_that_node() -> None:
    """`InstanceTable.usage` (the one-node fit of every pool start) counts what `instances()`
    lists on the node, stopping and dead ones left out, as the loop over it did."""
    table = InstanceTable()
    pooled = ProcessInstance(id="pool-1", eid=1, function=None, node="n")  # 128 MiB, 100m
    table.started(pooled)
    table.add_pooled(pooled)
    fs = table.ensure(parse_spec({"name": "f", "handler": "m:h"}))
    g = table.ensure(parse_spec({"name": "g", "handler": "m:h"}))
    made = [
        ("f", "idle", "n", 256, 500),
        ("f", "busy", "n", 512, 250),
        ("f", "stopping", "n", 1024, 1000),
        ("g", "starting", "n", 64, 50),
        ("g", "idle", "other", 2048, 2000),
        ("g", "dead", "n", 4096, 4000),
    ]
    for k, (fn, state, node, mb, cpu) in enumerate(made):
        inst = ProcessInstance(id=f"i{k}", eid=10 + k, function=fn, node=node)
        inst.state, inst.memory_mb, inst.cpu_millicores = state, mb, cpu
        (fs if fn == "f" else g).instances[inst.id] = inst
    counted = [
        i for i in table.instances() if i.node == "n" and i.state not in ("dead", "stopping")
    ]
    want = (sum(i.cpu_millicores for i in counted), sum(i.memory_mb for i in counted))
    assert table.usage("n") == want == (100 + 500 + 250 + 50, 128 + 256 + 512 + 64)
    assert table.usage("other") == (2000, 2048)


async def _from_the_read(
    runner: Recorder,
) -> tuple[Lifecycle, Any, ProcessInstance, asyncio.Future, list[tuple[str, str]]]:
    """A pool start made from the read (`Starts.start_now`), a call waiting behind it, and
    the instances the lifecycle kills (recorded)."""
    life, fs, pooled = _setup(runner)
    killed: list[tuple[str, str]] = []
    life.kill = lambda inst, why: killed.append((inst.id, why))  # type: ignore[method-assign]
    tasks = len(asyncio.all_tasks())
    plan = life.plan_now(fs.spec)
    assert plan is not None
    inst, unrouted = life.start_now(fs, plan, Descriptor(dst=7, src=0, kind=Kind.INVOKE))
    assert inst is pooled and unrouted == [] and pooled.inflight == 1 and fs.starting == 1
    assert len(asyncio.all_tasks()) == tasks  # it waits for the report without a task (#19)
    waiter = asyncio.get_running_loop().create_future()
    fs.waiters.append(waiter)
    return life, fs, pooled, waiter, killed


async def _passes(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_start_from_the_read_is_adopted_at_ready_recorded_after_its_call() -> None:
    life, fs, pooled, waiter, killed = await _from_the_read(Recorder())
    (watch,) = life._watches
    pooled.ready.set_result({"code_import_start": 2.0, "code_imported": 3.0, "ready": 4.0})
    await _passes()
    assert fs.starting == 0 and fs.instances == {"pool-1": pooled} and not killed
    assert watch.done()  # its bound, when it comes, finds it over
    expire(watch)
    assert not pooled.ready.cancelled() and not killed
    assert waiter.done() and waiter.result() is None  # the queue is woken, as by the task
    # its record waits for the answer of the call it was claimed for (test_pool_start_record.py)
    assert life.coldstarts.records == [] and pooled.after_answer is not None
    life.done(pooled)  # that call's reply
    await _passes()
    (rec,) = life.coldstarts.records
    assert rec["from_pool"] and rec["phases"]["spawned"] == 1.0


async def test_a_start_from_the_read_that_fails_is_killed_and_its_waiters_hear_why() -> None:
    life, fs, pooled, waiter, killed = await _from_the_read(Recorder())
    pooled.ready.set_exception(InvokeError(502, "cold_start_failed", "f: no handler"))
    await _passes()
    assert killed == [("pool-1", "cold start failed")] and fs.starting == 0
    assert isinstance(waiter.exception(), InvokeError)
    assert waiter.exception().detail == "f: no handler"  # type: ignore[union-attr]
    assert life.coldstarts.records == []


async def test_a_start_from_the_read_not_ready_in_time_fails_as_the_tasks_wait_for_did() -> None:
    """Its bound is max(30 s, the function's timeout) from the send; past it `ready` is
    cancelled (as `asyncio.wait_for` did), the instance killed, the waiters told 502."""
    life, fs, pooled, waiter, killed = await _from_the_read(Recorder())
    (watch,) = life._watches
    loop = asyncio.get_running_loop()
    ((when, _, bounded),) = life._ready_bounds._heap
    assert bounded is watch and 29 < when - loop.time() <= 30
    expire(watch)  # (what the bounds' timer does at that time)
    await _passes()
    assert pooled.ready.cancelled() and killed == [("pool-1", "cold start failed")]
    err = waiter.exception()
    assert isinstance(err, InvokeError) and (err.status, err.error) == (502, "cold_start_failed")
    assert err.detail == "f: " and fs.starting == 0 and not life._watches and watch.done()


async def test_a_start_from_the_read_left_at_close_ends_as_a_cancelled_task() -> None:
    life, fs, pooled, waiter, killed = await _from_the_read(Recorder())
    (watch,) = life._watches
    watch.cancel()  # (what `Lifecycle.close` does with those left)
    assert killed == [("pool-1", "cold start failed")] and fs.starting == 0
    assert watch.done() and not life._watches  # its bound is dropped unread
    pooled.ready.set_result({})  # a report after that changes nothing
    await _passes()
    assert not waiter.done() and life.coldstarts.records == [] and fs.instances == {}
