"""Starting instances: the lifecycle's request-path half (`agent.lifecycle.Lifecycle` holds it as a
mixin; the state is the lifecycle's). The admitter asks for a start between ticks (the request
path cannot wait for one): it is counted at once, placed (evicting idle instances in the
keep-alive policy's order when nothing fits), and made from a warm-pool instance, a zygote fork
or a new process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.coldstarts import ColdStartLog
from hearth.agent.deadlines import Deadlines
from hearth.agent.instance import Instance
from hearth.agent.runner import Runner
from hearth.agent.table import FunctionState, InstanceTable
from hearth.controller.keepalive import Candidate, PolicySet
from hearth.controller.model import Node
from hearth.controller.placement import Cluster, Request, fits_alone
from hearth.controller.pools import pool_can_serve
from hearth.dataplane.descriptor import Descriptor
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import PoolExhausted
from hearth.invoke import InvokeError
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")


@dataclass
class Launch:
    """An instance on its way up: a new one, or a pool instance sent its spec (`pooled`)."""

    inst: Instance
    pooled: bool
    requested: float
    spawned: float
    note: dict[str, Any]  # for the cold-start record: a wait for a zygote, a fallback
    handed: bool = False  # given to a waiting call already (`Starts.begin_start`)


@dataclass
class Plan:
    """A start that a free warm-pool instance can take right now (`Starts.plan_now`)."""

    inst: Instance
    requested: float
    note: dict[str, Any]


#: how long a start's cold-start record waits for the answer of the call that went ahead
RECORD_WAIT_S = 0.25
START_TIMEOUT_S = 30.0  #: a start's wait for the ready report, or the function's timeout if longer


def run_after_answer(inst: Instance) -> None:
    """Make the start's record that waited for its first call's answer (`_adopted`), once."""
    later = inst.after_answer
    if later is not None:
        inst.after_answer = None
        later()


class _ReadyWatch:
    """`_start_for`'s wait for the ready report of a pool start made from the read
    (`Starts.start_now`), without a task: a callback on the instance's `ready`, and its bound
    on the lifecycle's one timer for such bounds (`agent.deadlines.Deadlines`: a heap push per
    start, no timer handle made and cancelled). The task's creation, its extra loop pass and
    `wait_for`'s future, timer and wake-up were ~30 of the ~50 Python calls the agent made
    between the send and blocking again (#19; `scripts/count_start_calls.py`). The outcomes
    are the task's: ready -> the instance adopted and its start recorded; a failed start or
    none in time (`ready` cancelled, as `wait_for` does) -> killed, those waiting hear why;
    then `starting` drops and the queue is woken. `Lifecycle.close` cancels those left, as it
    cancels start tasks. An ended wait lets go of its start (the instance) at once: its bound
    stays in the heap until due or compacted (30 s), and held an exited instance that long."""

    __slots__ = ("starts", "fs", "go", "late", "ended")

    def __init__(self, starts: Starts, fs: FunctionState, go: Launch) -> None:
        ready = go.inst.ready
        assert ready is not None
        self.starts, self.fs, self.go, self.late, self.ended = starts, fs, go, False, False
        loop = ready.get_loop()
        bounds = starts._ready_bounds
        if bounds is None:
            bounds = starts._ready_bounds = Deadlines(loop)
        bound = max(starts.start_timeout_s, fs.spec.timeout_s)
        bounds.add(loop.time() + bound, self)  # type: ignore[arg-type]
        ready.add_done_callback(self._reported)
        starts._watches.add(self)

    def done(self) -> bool:
        """(for `Deadlines`: an ended wait's bound is dropped unread)"""
        return self.ended

    def set_exception(self, _: BaseException) -> None:
        """Its bound passed (`Deadlines`): `ready` cancelled, as `wait_for` does at its
        timeout; `_reported` then ends the start."""
        self.late = True
        self.go.inst.ready.cancel()  # type: ignore[union-attr]

    def cancel(self) -> None:
        """The agent is closing: as a start task cancelled in its wait (killed, no longer
        counted as starting; nobody is woken)."""
        self.go.inst.ready.remove_done_callback(self._reported)  # type: ignore[union-attr]
        self._end(None)

    def _reported(self, ready: asyncio.Future) -> None:
        self._end(ready)

    def _end(self, ready: asyncio.Future | None) -> None:
        if self.ended:  # (a close in the pass between `ready`'s end and this callback)
            return
        starts, fs, go = self.starts, self.fs, self.go
        inst = go.inst
        starts._watches.discard(self)
        self.ended = True
        # the heap keeps this until its bound is due: nothing of the start is held from here
        self.starts = self.fs = self.go = None  # type: ignore[assignment]
        try:
            if ready is None or ready.cancelled():
                starts.kill(inst, "cold start failed")
                if ready is None or not self.late:  # (the task's CancelledError: it ended)
                    return
                raise TimeoutError
            err = ready.exception()
            if err is not None:
                starts.kill(inst, "cold start failed")
                raise err
            starts._adopted(fs, go, ready.result())
        except Exception as e:
            starts._start_failed(fs, e)
        finally:
            fs.starting -= 1
        starts.admitter.wake(fs, fs.spec.concurrency)


class Starts:
    """`begin_start`, `start_instance`, `start_pool_instance`, `reported` and `place`."""

    table: InstanceTable
    pool: SlotPool
    runner: Runner
    admitter: Admitter
    coldstarts: ColdStartLog
    nodes: list[Node]
    policies: PolicySet
    closing: bool
    start_timeout_s: float  # how long a start waits for the ready report (START_TIMEOUT_S)
    _pool_starting: dict[str, int]
    _watches: set[_ReadyWatch]  # pool starts from the read waiting for their ready report
    _ready_bounds: Deadlines | None  # ...and their bounds (one loop timer for them all)
    _spawn_task: Callable[[Any], asyncio.Task]
    serve: Callable[[FunctionSpec], FunctionState]
    kill: Callable[[Instance, str], None]
    stop: Callable[..., Awaitable[None]]
    drain_and_stop: Callable[[Instance], Awaitable[None]]

    def begin_start(self, fs: FunctionState, node: str | None = None) -> asyncio.Task:
        """Count the start now (in this loop step, so a burst sees it), run it in a task. A
        warm-pool instance that can take the start is sent its spec here, in the caller's
        step: it begins importing a loop pass sooner than from the task (the admitter's call
        is already a task's step on the request path). A call waiting for it is handed the
        instance in the same step, and the spec is held to leave with that call's request in
        one message (`DataplaneLink.hold`): one wake-up of the instance, and the request is in
        its socket when the import ends, whenever the agent next gets the CPU."""
        fs.starting += 1
        try:
            begun: Launch | Exception | None = self._specialise_now(fs.spec, node, fs)
        except Exception as e:  # raised from the task, as a start that fails there
            begun = e
        return self._spawn_task(self._start_for(fs, node, begun))

    def plan_now(self, spec: FunctionSpec, node: str | None = None) -> Plan | None:
        """Whether a start of `spec` can be made right now from a free warm-pool instance,
        changing nothing: the node is known or placement has no choice to make, an idle pool
        instance is there, and no zygote is to be forked from or waited for. None: the
        start's task takes every step."""
        requested = time.time()
        if not self.table.pooled or self.closing or not pool_can_serve(spec):
            return None  # (no pool instance: the usual case of a node without a warm pool)
        node = node or self._fits_now(spec)
        pooled = None if node is None else self.table.free_pooled(node)
        if pooled is None:
            return None
        answer = self.runner.fork_now(spec)
        if answer is None or answer[0]:
            return None
        return Plan(pooled, requested, answer[1])

    def start_now(
        self, fs: FunctionState, plan: Plan, request: Descriptor
    ) -> tuple[Instance, list[Descriptor]] | None:
        """`begin_start` for a call read in a protocol callback that found no free instance
        (`Admitter.start_now`), with `plan_now`'s plan made in the same step: the pool
        instance is sent its spec and `request` (the caller's, addressed to it) in one
        ``sendmsg`` first, and only then is the start booked (counted, specialised in the
        table, claimed for that call, its task made): nothing the agent does after the send
        delays the instance (#19). The start's task (its ready report, the cold-start record,
        a failure) runs as for `begin_start`. Returns the instance and the descriptors the
        data plane could not route (the caller dispatches their errors once its call is
        booked); None, with nothing sent, done or counted, when the spec could not be
        written: the call takes the task's way, which says why."""
        inst, spec = plan.inst, fs.spec
        requested = time.time()  # (where `_specialise_now` stamps it: the records compare)
        try:
            spawned, unrouted = self.runner.specialise_with(inst, spec, request)
        except Exception:
            return None
        self.table.specialise(inst, spec, None)
        fs.starting += 1
        self.table.claim(inst)
        _ReadyWatch(self, fs, Launch(inst, True, requested, spawned, plan.note, handed=True))
        return inst, unrouted

    def _specialise_now(
        self, spec: FunctionSpec, node: str | None, owner: FunctionState
    ) -> Launch | None:
        """`start_instance`'s first steps without a coroutine, when nothing in them waits
        (`plan_now`); then handed to `owner`'s longest waiter, if any. None: the task takes
        every step."""
        plan = self.plan_now(spec, node)
        if plan is None:
            return None
        # held only for a live waiter, who is handed the instance below (nothing runs between):
        # its request follows, in this step or the next, and the spec leaves first or with it
        pooled = plan.inst
        hold = self.admitter.waiting(owner)
        spawned = self._specialise_pooled(pooled, spec, None, hold)
        go = Launch(pooled, True, plan.requested, spawned, plan.note)
        go.handed = hold and self.admitter.hand(owner, pooled)
        return go

    def _specialise_pooled(
        self, inst: Instance, spec: FunctionSpec, instance_id: str | None, hold: bool = False
    ) -> float:
        """Send a pool instance `spec`, then count it as a starting instance of it. The spec is
        written first: if that fails (the slot pool is full), the instance is still a free
        pool instance, not one "starting" forever with nothing sent to it."""
        spawned = self.runner.specialise(inst, spec, hold)  # the next tick refills the pool
        self.table.specialise(inst, spec, instance_id)
        return spawned

    async def _start_for(
        self, fs: FunctionState, node: str | None = None, begun: Launch | Exception | None = None
    ) -> None:
        """A cold start for `fs`; the caller has already counted it in `fs.starting` (and
        may have `begun` it: `_specialise_now`)."""
        try:
            if isinstance(begun, Exception):
                raise begun
            await self.start_instance(fs.spec, node=node, owner=fs, begun=begun)
        except Exception as e:
            self._start_failed(fs, e)
        finally:
            fs.starting -= 1
        self.admitter.wake(fs, fs.spec.concurrency)

    def _start_failed(self, fs: FunctionState, e: Exception) -> None:
        """A start failed: logged, and those waiting for it hear why (not a hang)."""
        gone = self.table.get(fs.spec.name) is None  # undeployed while it started
        (log.info if gone else log.warning)("cold start of %s failed: %s", fs.spec.name, e)
        if isinstance(e, InvokeError):
            err = e
        elif isinstance(e, PoolExhausted):  # (the spec could not be written) as a request's
            err = InvokeError(429, "no_space", f"shared-memory pool exhausted, retry later: {e}")
        else:
            err = InvokeError(502, "cold_start_failed", f"{fs.spec.name}: {e}")
        self.admitter.fail(fs, err)

    def _adopted(
        self,
        fs: FunctionState,
        go: Launch,
        reported: dict[str, Any],
        spec: FunctionSpec | None = None,
    ) -> None:
        """A started instance (of `spec`, by default `fs`'s) reported ready: counted as its
        function's, its start recorded."""
        inst, spec = go.inst, spec or fs.spec
        if inst.state == "starting":  # (or served ahead already: see `reported`)
            self.table.ready(inst, spec.keep_alive.ttl_s)  # kept until its first invocation
        owner = self.table.adopt(fs, inst)
        if spec.name not in self.table.functions:  # (no call: on every pool start's path)
            # undeployed while it started: not among the instances the undeploy stopped, and
            # unowned (it ran on until the node's close, which waited 10 s for it)
            self._spawn_task(self.drain_and_stop(inst))

        def record() -> None:
            try:
                self.coldstarts.record(
                    spec, inst, go.requested, go.spawned, reported, owner, note=go.note
                )
            except Exception:  # (an instance's odd phases): a record never breaks serving
                log.exception("the cold-start record of %s failed", inst.id)

        if inst.inflight and inst.live:
            # a call went ahead of the report (sent with the spec, or handed): its answer
            # first. The record (phases, metrics, the push to Redis: 0.2-0.5 ms of the
            # agent's CPU) ran here, between the report and that call's reply, on the vCPU
            # the instance's handler runs on (#19). A first call still running after
            # RECORD_WAIT_S (a long job) does not hold it longer
            inst.after_answer = record
            asyncio.get_running_loop().call_later(RECORD_WAIT_S, run_after_answer, inst)
        else:
            record()

    async def ensure_min(self, fs: FunctionState) -> None:
        if not self.hosted(fs.spec.name):
            return
        missing = fs.spec.min_instances - len(fs.live()) - fs.starting
        await asyncio.gather(
            *(self.begin_start(fs) for _ in range(max(0, missing))), return_exceptions=True
        )

    async def start_instance(
        self,
        spec: FunctionSpec,
        *,
        node: str | None = None,
        use_pool: bool = True,
        instance_id: str | None = None,
        from_pool: str | None = None,
        owner: FunctionState | None = None,
        begun: Launch | None = None,
    ) -> Instance:
        """Start one ready instance of `spec` on `node` (default: placement decides) and serve
        it: a warm-pool instance on that node is specialised when there is one, else the runner
        starts a new one. `begun`: a pool instance already sent `spec` (`_specialise_now`)."""
        go = begun or await self._launch(spec, node, use_pool, instance_id, from_pool)
        inst = go.inst
        if (
            owner is not None
            and not go.handed
            and (go.pooled or getattr(inst, "preregistered", False))
        ):
            # its endpoint is registered: a waiting request goes now and waits in the
            # instance's socket until its handler is loaded (spec → ready → invoke becomes
            # one trip); if it dies first, the call fails as any call to a dead instance
            self.admitter.hand(owner, inst)
        try:
            assert inst.ready is not None
            reported = await asyncio.wait_for(inst.ready, max(self.start_timeout_s, spec.timeout_s))
        except BaseException:
            self.kill(inst, "cold start failed")
            raise
        self._adopted(owner or self.serve(spec), go, reported, spec)
        return inst

    async def _launch(
        self,
        spec: FunctionSpec,
        node: str | None,
        use_pool: bool,
        instance_id: str | None,
        from_pool: str | None,
    ) -> Launch:
        """Place, then specialise a pool instance or have the runner start one."""
        requested = time.time()
        node = node or await self.place(spec)
        pooled = None
        note: dict[str, Any] = {}
        if from_pool is not None:
            pooled = self.table.free_pooled(node, from_pool)
            if pooled is None:
                raise ValueError(
                    f"pool instance {from_pool!r} is not an idle pool instance on {node!r}"
                )
        elif use_pool and pool_can_serve(spec) and self.table.free_pooled(node) is not None:
            # the built-ins' zygote forks a FedAvg aggregator in ~10 ms, even after a wait for
            # it to come up; a pool instance would load its numba kernels itself (0.5-0.9 s,
            # seconds of compiles on a fresh machine)
            fork, note = await self.runner.fork_preloaded(spec)
            if not fork:
                pooled = self.table.free_pooled(node)
        if pooled is not None:
            inst = pooled
            spawned = self._specialise_pooled(inst, spec, instance_id)
        else:
            inst, spawned = await self.runner.spawn(spec, node, instance_id)
        return Launch(inst, pooled is not None, requested, spawned, note)

    async def start_pool_instance(self, node: str, instance_id: str | None = None) -> Instance:
        """One generic warm-pool instance on `node`, ready to be specialised."""
        self._pool_starting[node] = self._pool_starting.get(node, 0) + 1
        try:
            inst, _ = await self.runner.spawn(None, node, instance_id)
            self.table.add_pooled(inst)
        finally:
            self._pool_starting[node] -= 1
        try:
            assert inst.ready is not None
            self.table.pooled_ready(inst, await asyncio.wait_for(inst.ready, self.start_timeout_s))
        except BaseException:
            self.table.drop_pooled(inst)
            self.kill(inst, "pool start failed")
            raise
        return inst

    def reported(self, eid: int, meta: dict[str, Any]) -> None:
        """An instance's first report: ready (or pooled) with its phases, or failed. A pool
        instance's says whether it has read its spec (`spec_read`): then its slot is freed now;
        a pool instance that failed before (a request overtook its spec) frees it at its exit."""
        inst = self.table.by_eid.get(eid)
        if inst is None:
            return
        if meta.get("spec_read"):
            self.spec_read(inst)
        if inst.ready is None or inst.ready.done():
            return
        if meta.get("type") in ("ready", "pooled"):
            inst.ready.set_result(meta.get("phases") or {})
            fs = self.table.get(inst.function or "")
            if inst.state == "starting" and inst.inflight and fs is not None:
                # a request went ahead of this report (`Admitter.hand`): count the instance
                # as its function's now, before that request's reply (next in the socket)
                # returns to its caller; start_instance's own steps later change nothing
                self.table.ready(inst, fs.spec.keep_alive.ttl_s)
                self.table.adopt(fs, inst)
        else:
            inst.ready.set_exception(
                InvokeError(
                    502,
                    "cold_start_failed",
                    f"{inst.function}: {meta.get('error', 'instance failed to start')}",
                )
            )

    def spec_read(self, inst: Instance) -> None:
        """Free the spec slot a pool instance was sent (`Runner.specialise`) once it has read
        it (its report says so: `reported`) or never will (it ended: `Lifecycle.exited`): the
        instance leaves the slot to the agent, so it takes no pool lock between its spec and
        its import (#19)."""
        held = inst.spec_slot
        if held is not None:
            inst.spec_slot = None
            self.pool.release_if_owner(*held)

    # -- placement ------------------------------------------------------------------------------
    async def place(self, spec: FunctionSpec) -> str:
        """The node for a new instance of `spec` (placement core). Under memory pressure, idle
        instances are evicted in the order the keep-alive policy chooses, then placement retries."""
        fits = self._fits_now(spec)
        if fits is not None:
            return fits
        specs = {n: fs.spec for n, fs in self.table.functions.items()}
        req = Request.for_spec(spec)
        for _ in range(64):
            cluster = Cluster.from_observation(self.nodes, self.table.observed(), specs)
            i = cluster.best(req)
            if i is not None:
                return cluster.names[i]
            victim = self._eviction_candidate(spec.name)
            if victim is None:
                raise InvokeError(
                    429,
                    "no_capacity",
                    f"no node has {spec.resources.cpu_millicores}m CPU and {spec.resources.memory_mb} MiB free for {spec.name!r}",
                )
            await self.stop(victim, "evicted under memory pressure")
        raise InvokeError(429, "no_capacity", f"could not make room for {spec.name!r}")

    def _fits_now(self, spec: FunctionSpec) -> str | None:
        """The node, when placement has no choice to make: one node, and `spec` fits there
        now (what `Cluster.best` answers for one node, without building the observation)."""
        if len(self.nodes) != 1:
            return None
        node = self.nodes[0]
        cpu, mem = self.table.usage(node.name)
        return node.name if fits_alone(node, cpu, mem, Request.for_spec(spec)) else None

    def _eviction_candidate(self, for_function: str) -> Instance | None:
        pooled = [i for i in self.table.pooled.values() if i.state == "pooled"]
        if pooled:
            return pooled[0]
        cands = {}
        for fs in self.table.functions.values():
            for inst in fs.instances.values():
                if (
                    inst.state == "idle"
                    and inst.inflight == 0
                    and len(fs.live()) > fs.spec.min_instances
                ):
                    cands[inst.id] = (
                        inst,
                        Candidate(inst.id, fs.spec.name, inst.last_used, inst.memory_mb),
                    )
        if not cands:
            return None
        order = self.policies.get(for_function).eviction_order(
            [c for _, c in cands.values()], time.time()
        )
        victim = cands[order[0].instance_id][0]
        self.policies.get(victim.function or "").evicted(victim.function or "", time.time())
        return victim
