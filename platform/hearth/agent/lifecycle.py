"""Instance lifecycle: which instances start, where, and when they stop.

It starts instances when the admitter asks (scale out) or a function needs its minimum,
places them (evicting idle instances under memory pressure in the keep-alive policy's order),
keeps the generic warm pool filled, and each tick stops idle instances whose keep-alive window
ended. It carries decisions out through the runner and records state through the table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.coldstarts import ColdStartLog
from hearth.agent.instance import Instance, InstanceDied  # noqa: F401 - re-exported
from hearth.agent.link import DataplaneLink
from hearth.agent.runner import Runner
from hearth.agent.table import FunctionState, InstanceTable
from hearth.controller.keepalive import Candidate, PolicySet, Profile
from hearth.controller.model import Node
from hearth.controller.placement import Cluster, Request
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError
from hearth.metrics import Metrics
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")

TICK_S = 0.05
RECLAIM_EVERY_S = 2.0


def local_nodes(name: str) -> list[Node]:
    """This machine as one node (simulated nodes share its data plane)."""
    try:
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError):
        mem = 8192
    return [Node(name=name, cpu_millicores=(os.cpu_count() or 1) * 4000, memory_mb=mem)]


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
        self.warm_pool_size = warm_pool_size
        self.runner: Runner  # set by the agent (the runner reports exits back here)
        self.admitter: Admitter  # set by the agent (the admitter asks us to scale out)
        self.closing = False
        self._refilling = False
        self._last_reclaim = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None

    def _spawn_task(self, coro: Any) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- running ------------------------------------------------------------------------------
    def run(self) -> None:
        self._ticker = asyncio.create_task(self._tick_loop(), name="agent-lifecycle")
        if self.warm_pool_size:
            self._spawn_task(self.refill_pool())

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
        self.policies.set(spec.name, spec.keep_alive.policy)
        fs, old = self.table.serve(spec)
        if old is not None:  # redeploy: new invocations go to new instances; old ones drain
            self._spawn_task(self.stop_all(old))
        await self.ensure_min(fs)

    def serve(self, spec: FunctionSpec) -> FunctionState:
        """Serve `spec` without starting anything (the controller starts its instances)."""
        if self.table.get(spec.name) is None:
            self.policies.set(spec.name, spec.keep_alive.policy)
        return self.table.ensure(spec)

    async def undeploy(self, name: str) -> bool:
        from hearth.invoke import UnknownFunction

        fs = self.table.remove(name)
        if fs is None:
            return False
        self.admitter.fail(fs, UnknownFunction(name))
        await self.stop_all(fs)
        return True

    # -- starting -------------------------------------------------------------------------------
    def begin_start(self, fs: FunctionState) -> asyncio.Task:
        """Count the start now (in this loop step, so a burst sees it), run it in a task."""
        fs.starting += 1
        return self._spawn_task(self._start_for(fs))

    async def _start_for(self, fs: FunctionState) -> None:
        """A cold start for `fs`; the caller has already counted it in `fs.starting`."""
        try:
            await self.start_instance(fs.spec, owner=fs)
        except Exception as e:
            log.warning("cold start of %s failed: %s", fs.spec.name, e)
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
    ) -> Instance:
        """Start one ready instance of `spec` on `node` (default: placement decides) and serve
        it: a warm-pool instance on that node is specialised when there is one, else the runner
        starts a new one."""
        requested = time.time()
        node = node or await self.place(spec)
        pooled = None
        if from_pool is not None:
            pooled = self.table.free_pooled(node, from_pool)
            if pooled is None:
                raise ValueError(
                    f"pool instance {from_pool!r} is not an idle pool instance on {node!r}"
                )
        elif use_pool:
            pooled = self.table.free_pooled(node)
        if pooled is not None:
            inst = pooled
            self.table.specialise(inst, spec, instance_id)
            spawned = await self.runner.specialise(inst, spec)
            self._spawn_task(self.refill_pool())
        else:
            inst, spawned = await self.runner.spawn(spec, node, instance_id)
        try:
            assert inst.ready is not None
            reported = await asyncio.wait_for(inst.ready, timeout=max(30.0, spec.timeout_s))
        except BaseException:
            self.kill(inst, "cold start failed")
            raise
        self.table.ready(inst, spec.keep_alive.ttl_s)  # kept until its first invocation
        fs = self.table.adopt(owner or self.serve(spec), inst)
        self.coldstarts.record(spec, inst, requested, spawned, reported, fs)
        return inst

    async def start_pool_instance(self, node: str, instance_id: str | None = None) -> Instance:
        """One generic warm-pool instance on `node`, ready to be specialised."""
        inst, _ = await self.runner.spawn(None, node, instance_id)
        self.table.add_pooled(inst)
        try:
            assert inst.ready is not None
            self.table.pooled_ready(inst, await asyncio.wait_for(inst.ready, 30))
        except BaseException:
            self.table.drop_pooled(inst)
            self.kill(inst, "pool start failed")
            raise
        return inst

    async def refill_pool(self) -> None:
        """Keep `warm_pool_size` generic instances per node (Fission-style pools)."""
        if self._refilling:
            return
        self._refilling = True
        try:
            for n in self.nodes:
                while (
                    not self.closing
                    and sum(1 for i in self.table.pooled.values() if i.node == n.name)
                    < self.warm_pool_size
                ):
                    try:
                        await self.start_pool_instance(n.name)
                    except Exception as e:
                        log.warning("warm-pool instance failed to start: %s", e)
                        return
        finally:
            self._refilling = False

    def reported(self, eid: int, meta: dict[str, Any]) -> None:
        """An instance's first report: ready (or pooled) with its phases, or failed."""
        inst = self.table.by_eid.get(eid)
        if inst is None or inst.ready is None or inst.ready.done():
            return
        if meta.get("type") in ("ready", "pooled"):
            inst.ready.set_result(meta.get("phases") or {})
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

    # -- keep-alive -----------------------------------------------------------------------------
    def profile(self, fs: FunctionState) -> Profile:
        return Profile(
            memory_mb=fs.spec.resources.memory_mb,
            cold_start_s=fs.cold_start_s or 1.0,
            ttl_s=fs.spec.keep_alive.ttl_s,
        )

    def arrived(self, fs: FunctionState, now: float) -> None:
        """An invocation arrived: the keep-alive policy learns the idle time it ended."""
        fs.last_arrival = now
        busy = any(i.inflight for i in fs.instances.values())
        idle_s = None if busy or fs.idle_since is None else now - fs.idle_since
        self.policies.get(fs.spec.name).record(fs.spec.name, now, idle_s, self.profile(fs))

    def done(self, inst: Instance) -> None:
        """An invocation on `inst` finished (the link saw its reply)."""
        fs = self.table.get(inst.function or "")
        if self.table.done(inst) and fs is not None:
            self._went_idle(fs, inst, inst.last_used)
        self.admitter.wake(fs)

    def _went_idle(self, fs: FunctionState, inst: Instance, now: float) -> None:
        """Ask the function's keep-alive policy how long this idle instance stays loaded."""
        if all(i.inflight == 0 for i in fs.instances.values()):
            fs.idle_since = now
        w = self.policies.get(fs.spec.name).window(fs.spec.name, now, self.profile(fs))
        keep = w.keep_s if w.keep_s != float("inf") else fs.spec.keep_alive.ttl_s
        if w.prewarm_s > 0:  # unload now, come back just before the predicted next arrival
            self.table.keep(inst, now)
            fs.prewarm_at = now + w.prewarm_s
        else:
            self.table.keep(inst, now + max(0.0, keep))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(time.time())
            except Exception:
                log.exception("lifecycle tick failed")

    def tick(self, now: float) -> None:
        """Scale in idle instances when their keep-alive window ends; pre-warm when a policy
        asks; keep min instances."""
        for fs in list(self.table.functions.values()):
            live = fs.live()
            for inst in live:
                if (
                    inst.state == "idle"
                    and inst.inflight == 0
                    and now >= inst.keep_until
                    and len(fs.live()) > fs.spec.min_instances
                    and not fs.waiters
                ):
                    self._spawn_task(self.stop(inst, "keep-alive expired"))
            if len(live) < fs.spec.min_instances and fs.starting == 0:
                self._spawn_task(self.ensure_min(fs))
            if fs.prewarm_at is not None and now >= fs.prewarm_at:
                fs.prewarm_at = None
                if not live and fs.starting == 0:
                    self.begin_start(fs)  # off the request path
        self._update_gauges()
        if now - self._last_reclaim > RECLAIM_EVERY_S:  # slots of processes that died unseen
            self._last_reclaim = now
            self.pool.reclaim_dead()

    def _update_gauges(self) -> None:
        self.metrics.instances.clear()
        for name, counts in self.table.state_counts().items():
            for state in ("starting", "idle", "busy", "stopping"):
                self.metrics.instances.labels(name, state).set(counts.get(state, 0))
        self.metrics.instances.labels("(pool)", "pooled").set(len(self.table.pooled))
