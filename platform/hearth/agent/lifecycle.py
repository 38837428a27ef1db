"""Instance lifecycle: which instances start, where, and when they stop.

Every tick it turns the table into an observation for the controller's decision core (the same
`DecisionCore` the Kubernetes controller runs) and carries its actions out: idle instances stop
by the core's one rule (keep-alive window over, above the autoscaler's floor), keep-until times,
pre-warm and min-instance starts, warm-pool refills; it stops instances and reports exits.
Between ticks it starts instances when the admitter asks (the request path cannot wait for a
tick): `agent.starts`, its mixin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.coldstarts import ColdStartLog
from hearth.agent.instance import POOL_RUNTIME, Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.runner import Runner
from hearth.agent.starts import START_TIMEOUT_S, Starts, run_after_answer
from hearth.agent.table import FunctionState, InstanceTable
from hearth.controller.decide import DecisionCore
from hearth.controller.keepalive import PolicySet
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
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError
from hearth.metrics import Metrics
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")

TICK_S = 0.1  # how often the decision core runs (keep-alive windows end on this grain)
RECLAIM_EVERY_S = 2.0
STOP_GRACE_S = 10.0  # a stopped instance's time to finish and exit (`Lifecycle.stop`)


def local_nodes(name: str) -> list[Node]:
    """This machine as one node (simulated nodes share its data plane)."""
    try:
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError):
        mem = 8192
    return [Node(name=name, cpu_millicores=(os.cpu_count() or 1) * 4000, memory_mb=mem)]


class Lifecycle(Starts):
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
        self._watches: set[Any] = set()  # `Starts.start_now`'s waits for a ready report
        self._ready_bounds: Any = None  # their bounds' timer (made with the first)
        self._ticker: asyncio.Task | None = None
        # how long a stopped instance has to finish and exit before it is killed
        self.stop_grace_s = STOP_GRACE_S
        self.start_timeout_s = START_TIMEOUT_S  # (HEARTH_START_TIMEOUT_S)
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
        """Stop every instance, all at once: the stop graces of hung instances (`stop_grace_s`,
        then a joined pod's `KILL_GRACE_S`) run side by side, one bound for them all. They ran
        one function after another, then the pool's (before 7 Dec 2026): a close with hung
        instances in n functions waited n graces."""
        self.closing = True
        await asyncio.gather(
            *(
                self.drain_and_stop(i)
                for fs in self.table.functions.values()
                for i in fs.instances.values()
            ),
            *(self.stop(i, "shutdown") for i in list(self.table.pooled.values())),
            return_exceptions=True,
        )
        # every instance has exited: let the runner report them (slot reclaim) before the pool
        # goes away with the platform
        await self.runner.close()
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for w in list(self._watches):
            w.cancel()
        if self._ready_bounds is not None:
            self._ready_bounds.close()
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

    # -- stopping -------------------------------------------------------------------------------
    def kill(self, inst: Instance, why: str) -> None:
        if inst.running:
            (log.debug if self.closing else log.warning)("killing instance %s: %s", inst.id, why)
            if why == "shutdown":
                self.table.stopping(inst)
            self.runner.kill(inst)
            if inst.ending:
                # its kind's kill only asks it to end (a pod, gone once it closes its end:
                # `JoinedInstance.kill`): no call is routed to it meanwhile
                self.table.stopping(inst)

    async def stop(self, inst: Instance, why: str, grace: float | None = None) -> None:
        """Graceful stop: only when idle; the instance finishes and exits within `grace`
        (default `stop_grace_s`), else it is killed."""
        self.table.stopping(inst)
        log.debug("stopping instance %s: %s", inst.id, why)
        await self.runner.stop(inst, self.stop_grace_s if grace is None else grace)

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
        self.spec_read(inst)  # sent a spec it never reported on
        if inst.ready is not None and not inst.ready.done():
            inst.ready.set_exception(
                InvokeError(
                    502,
                    "cold_start_failed",
                    f"instance {inst.id} exited with code {rc} before it was ready",
                )
            )
        await self.link.fail_pending(inst, rc)
        freed = self.pool.reclaim_dead(self.table.joined_owners())
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
        run_after_answer(inst)  # ended before answering its first call: recorded all the same

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
        if inst.after_answer is not None:  # (a read only on a warm call's path)
            # after the answer: the reply's dispatch, which called this, answers a call
            # started from the read in its own step; a task waiting on the reply resumes in
            # the next step, hence the second hop
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, run_after_answer, inst)

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
            self.pool.reclaim_dead(self.table.joined_owners())
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
