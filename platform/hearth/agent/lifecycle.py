"""Instance lifecycle: which instances start, where, and when they stop.

Every tick it turns the table into an observation for the controller's decision core (the same
`DecisionCore` the Kubernetes controller runs) and carries its actions out: idle instances stop
by the core's one rule (keep-alive window over, above the autoscaler's floor), keep-until times,
pre-warm and min-instance starts, warm-pool refills. Between ticks it starts instances when the
admitter asks (the request path cannot wait for a tick), places them (evicting idle instances in
the keep-alive policy's order when nothing fits) and reports exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.coldstarts import ColdStartLog
from hearth.agent.instance import POOL_RUNTIME, Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.runner import Runner
from hearth.agent.table import FunctionState, InstanceTable
from hearth.controller.decide import DecisionCore
from hearth.controller.keepalive import Candidate, PolicySet
from hearth.controller.model import (
    Action,
    FunctionLoad,
    Keep,
    Node,
    Observation,
    Prewarm,
    Start,
    Stop,
)
from hearth.controller.model import Instance as ObservedInstance
from hearth.controller.placement import Cluster, Request, fits_alone
from hearth.controller.pools import pool_can_serve
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError
from hearth.metrics import Metrics
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")

TICK_S = 0.1  # how often the decision core runs (keep-alive windows end on this grain)
RECLAIM_EVERY_S = 2.0


def local_nodes(name: str) -> list[Node]:
    """This machine as one node (simulated nodes share its data plane)."""
    try:
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError):
        mem = 8192
    return [Node(name=name, cpu_millicores=(os.cpu_count() or 1) * 4000, memory_mb=mem)]


@dataclass
class Launch:
    """An instance on its way up: a new one, or a pool instance sent its spec (`pooled`)."""

    inst: Instance
    pooled: bool
    requested: float
    spawned: float
    note: dict[str, Any]  # for the cold-start record: a wait for a zygote, a fallback


class Lifecycle:
    def __init__(
        self,
        *,
        pool: SlotPool,
        table: InstanceTable,
        link: DataplaneLink,
        metrics: Metrics,
        coldstarts: ColdStartLog,
        nodes: list[Node],
        policies: PolicySet,
        warm_pool_size: int = 0,
    ) -> None:
        self.pool = pool
        self.table = table
        self.link = link
        self.metrics = metrics
        self.coldstarts = coldstarts
        self.nodes = nodes
        self.policies = policies
        self.core = DecisionCore(policies=policies)  # shares the policies (eviction order)
        self.warm_pool_size = warm_pool_size
        self._pool_starting: dict[str, int] = {}  # node -> pool starts not in the table yet
        self.runner: Runner  # set by the agent (the runner reports exits back here)
        self.admitter: Admitter  # set by the agent (the admitter asks us to scale out)
        self.closing = False
        self._refilling = False
        self._last_reclaim = 0.0
        self.ticks = 0  # decisions made (/v1/status: a test can wait for the next one)
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        # does this node host the function? (False: placed on other nodes, they keep its minimum)
        self.hosted: Callable[[str], bool] = lambda name: True

    def _spawn_task(self, coro: Any) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- running ------------------------------------------------------------------------------
    def run(self) -> None:
        self._ticker = asyncio.create_task(self._tick_loop(), name="agent-lifecycle")

    async def close(self) -> None:
        self.closing = True
        for fs in list(self.table.functions.values()):
            await self.stop_all(fs)
        await asyncio.gather(
            *(self.stop(i, "shutdown") for i in list(self.table.pooled.values())),
            return_exceptions=True,
        )
        # every instance has exited: let the runner report them (slot reclaim) before the pool
        # goes away with the platform
        await self.runner.close()
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- functions ------------------------------------------------------------------------------
    async def deploy(self, spec: FunctionSpec) -> None:
        self.runner.prepare(spec)
        fs, old = self.table.serve(spec)
        if old is not None:  # redeploy: new invocations go to new instances; old ones drain
            self._spawn_task(self.stop_all(old))
        await self.ensure_min(fs)

    def serve(self, spec: FunctionSpec) -> FunctionState:
        """Serve `spec` without starting anything (the controller starts its instances)."""
        self.runner.prepare(spec)
        return self.table.ensure(spec)

    async def undeploy(self, name: str) -> bool:
        from hearth.invoke import UnknownFunction

        fs = self.table.remove(name)
        if fs is None:
            return False
        self.admitter.fail(fs, UnknownFunction(name))
        self.runner.forget(name)  # pods: starts waiting for a pod end now
        await self.stop_all(fs)
        return True

    # -- starting -------------------------------------------------------------------------------
    def begin_start(self, fs: FunctionState, node: str | None = None) -> asyncio.Task:
        """Count the start now (in this loop step, so a burst sees it), run it in a task. A
        warm-pool instance that can take the start is sent its spec here, in the caller's
        step: it begins importing a loop pass sooner than from the task (the admitter's call
        is already a task's step on the request path)."""
        fs.starting += 1
        try:
            begun: Launch | Exception | None = self._specialise_now(fs.spec, node)
        except Exception as e:  # raised from the task, as a start that fails there
            begun = e
        return self._spawn_task(self._start_for(fs, node, begun))

    def _specialise_now(self, spec: FunctionSpec, node: str | None) -> Launch | None:
        """`start_instance`'s first steps without a coroutine, when nothing in them waits: the
        node is known or fits at once, an idle pool instance is there, and no zygote is to be
        forked from or waited for. None: the task takes every step."""
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
        self.table.specialise(pooled, spec, None)
        spawned = self.runner.specialise(pooled, spec)  # the next tick refills the pool
        return Launch(pooled, True, requested, spawned, answer[1])

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
            gone = self.table.get(fs.spec.name) is None  # undeployed while it started
            (log.info if gone else log.warning)("cold start of %s failed: %s", fs.spec.name, e)
            err = (
                e
                if isinstance(e, InvokeError)
                else InvokeError(502, "cold_start_failed", f"{fs.spec.name}: {e}")
            )
            self.admitter.fail(fs, err)  # those waiting for this start hear why, not a hang
        finally:
            fs.starting -= 1
        self.admitter.wake(fs, fs.spec.concurrency)

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
        if owner is not None and (go.pooled or getattr(inst, "preregistered", False)):
            # its endpoint is registered: a waiting request goes now and waits in the
            # instance's socket until its handler is loaded (spec → ready → invoke becomes
            # one trip); if it dies first, the call fails as any call to a dead instance
            self.admitter.hand(owner, inst)
        try:
            assert inst.ready is not None
            reported = await asyncio.wait_for(inst.ready, timeout=max(30.0, spec.timeout_s))
        except BaseException:
            self.kill(inst, "cold start failed")
            raise
        if inst.state == "starting":  # (or served ahead already: see `reported`)
            self.table.ready(inst, spec.keep_alive.ttl_s)  # kept until its first invocation
        fs = self.table.adopt(owner or self.serve(spec), inst)
        self.coldstarts.record(spec, inst, go.requested, go.spawned, reported, fs, note=go.note)
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
            # it to come up; a pool instance would load its numba kernels itself (0.5-0.9 s)
            fork, note = await self.runner.fork_preloaded(spec)
            if not fork:
                pooled = self.table.free_pooled(node)
        if pooled is not None:
            inst = pooled
            self.table.specialise(inst, spec, instance_id)
            spawned = self.runner.specialise(inst, spec)  # the next tick refills the pool
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
            self.table.pooled_ready(inst, await asyncio.wait_for(inst.ready, 30))
        except BaseException:
            self.table.drop_pooled(inst)
            self.kill(inst, "pool start failed")
            raise
        return inst

    def reported(self, eid: int, meta: dict[str, Any]) -> None:
        """An instance's first report: ready (or pooled) with its phases, or failed."""
        inst = self.table.by_eid.get(eid)
        if inst is None or inst.ready is None or inst.ready.done():
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
        node, cpu, mem = self.nodes[0], 0, 0
        for inst in self.table.instances():
            if inst.node == node.name and inst.state not in ("dead", "stopping"):
                cpu += inst.cpu_millicores
                mem += inst.memory_mb
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

    # -- stopping -------------------------------------------------------------------------------
    def kill(self, inst: Instance, why: str) -> None:
        if inst.running:
            (log.debug if self.closing else log.warning)("killing instance %s: %s", inst.id, why)
            if why == "shutdown":
                self.table.stopping(inst)
            self.runner.kill(inst)

    async def stop(self, inst: Instance, why: str, grace: float = 10.0) -> None:
        """Graceful stop: only when idle; the instance finishes and exits, else it is killed."""
        self.table.stopping(inst)
        log.debug("stopping instance %s: %s", inst.id, why)
        await self.runner.stop(inst, grace)

    async def drain_and_stop(self, inst: Instance) -> None:
        while inst.inflight > 0 and inst.state != "dead":
            await asyncio.sleep(0.01)
        await self.stop(inst, "shutdown")

    async def stop_all(self, fs: FunctionState) -> None:
        await asyncio.gather(
            *(self.drain_and_stop(i) for i in list(fs.instances.values())), return_exceptions=True
        )

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> bool:
        """Stop one instance by id (drained first when graceful); False if unknown."""
        inst = self.table.find(instance_id)
        if inst is None:
            return False
        if graceful:
            await self.drain_and_stop(inst)
        else:
            self.kill(inst, "stopped by the controller")
        return True

    async def exited(self, inst: Instance, rc: int) -> None:
        """The runner saw `inst` end: forget it, fail what waited on it, free its slots."""
        was, fs = self.table.dead(inst)
        if inst.ready is not None and not inst.ready.done():
            inst.ready.set_exception(
                InvokeError(
                    502,
                    "cold_start_failed",
                    f"instance {inst.id} exited with code {rc} before it was ready",
                )
            )
        await self.link.fail_pending(inst, rc)
        freed = self.pool.reclaim_dead()
        if was != "stopping" and not self.closing:
            log.warning(
                "instance %s (%s) exited with code %s; %d slot(s) reclaimed",
                inst.id,
                inst.function,
                rc,
                freed,
            )
        if fs is not None:
            self.admitter.wake(fs, len(fs.waiters))  # waiters re-evaluate: maybe a replacement

    # -- decisions ------------------------------------------------------------------------------
    def arrived(self, fs: FunctionState, now: float) -> None:
        """An invocation arrived: the core's keep-alive policies and autoscaler learn it."""
        fs.last_arrival = now
        fs.arrivals.append(now)

    def done(self, inst: Instance) -> None:
        """An invocation on `inst` finished (the link saw its reply)."""
        fs = self.table.get(inst.function or "")
        self.table.done(inst)
        self.admitter.wake(fs)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(time.time())
            except Exception:
                log.exception("lifecycle tick failed")

    def observe(self, now: float) -> Observation:
        """The table as the decision core sees it. Starts in flight count as `starting`
        instances (on no node yet), so the core does not start them twice."""
        instances = self.table.observed()
        loads, specs = {}, {}
        for name, fs in self.table.functions.items():
            specs[name] = fs.spec
            instances += [
                ObservedInstance(f"{name}/starting-{k}", name, "", "starting", fs.spec.runtime)
                for k in range(fs.starting)
            ]
            loads[name] = FunctionLoad(
                name,
                # with the requests handed to starting instances (`Admitter.hand`): no longer
                # queued, yet work, so the core does not take the function for idle meanwhile
                inflight=sum(i.inflight for i in fs.instances.values()) + self.table.ahead(name),
                queued=len(fs.waiters),
                arrivals=tuple(fs.arrivals),
                cold_start_s=fs.cold_start_s,
            )
            fs.arrivals.clear()
        for node, n in self._pool_starting.items():
            instances += [
                ObservedInstance(f"pool/{node}/starting-{k}", None, node, "starting", POOL_RUNTIME)
                for k in range(n)
            ]
        return Observation(
            now=now,
            nodes=self.nodes,
            instances=instances,
            functions=specs,
            loads=loads,
            pool_targets={POOL_RUNTIME: self.warm_pool_size} if self.warm_pool_size else {},
        )

    def tick(self, now: float) -> list[Action]:
        """One decision: observe, ask the core, carry its actions out."""
        actions = [] if self.closing else self.core.decide(self.observe(now))
        by_id = {i.id: i for i in self.table.instances()}
        for a in actions:
            self._execute(a, by_id)
        self._update_gauges()
        self.ticks += 1
        if now - self._last_reclaim > RECLAIM_EVERY_S:  # slots of processes that died unseen
            self._last_reclaim = now
            self.pool.reclaim_dead()
        return actions

    def _execute(self, a: Action, by_id: dict[str, Instance]) -> None:
        if isinstance(a, Stop):
            inst = by_id.get(a.instance_id)
            fs = self.table.get(inst.function or "") if inst is not None else None
            # never one that took work since the observation, nor while invocations wait
            if inst is not None and inst.state == "idle" and inst.inflight == 0:
                if fs is None or not fs.waiters:
                    self.table.stopping(inst)
                    self._spawn_task(self.stop(inst, a.reason))
        elif isinstance(a, Keep):
            inst = by_id.get(a.instance_id)
            if inst is not None:
                self.table.keep(inst, a.until)
        elif isinstance(a, Start):
            fs = self.table.get(a.function)
            # one core-initiated start in flight per function: no cold-start storm
            if fs is not None and fs.starting == 0:
                self.begin_start(fs, a.node or None)
        elif isinstance(a, Prewarm):
            self._spawn_task(self._prewarm(a.node, a.instance_id))
        # Buffer: the admitter already holds invocations while an instance starts

    async def _prewarm(self, node: str, instance_id: str) -> None:
        try:
            await self.start_pool_instance(node, instance_id)
        except Exception as e:
            log.warning("warm-pool instance failed to start: %s", e)

    def _update_gauges(self) -> None:
        self.metrics.instances.clear()
        for name, counts in self.table.state_counts().items():
            for state in ("starting", "idle", "busy", "stopping"):
                self.metrics.instances.labels(name, state).set(counts.get(state, 0))
        self.metrics.instances.labels("(pool)", "pooled").set(len(self.table.pooled))
