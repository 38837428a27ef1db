"""The instance table: which functions this agent serves and every instance it holds.

It is the only writer of the instance state machine
    starting → (pooled →) idle ⇄ busy → stopping → dead
and of the per-instance bookkeeping (inflight, served, last_used, keep_until), so every other
part asks it to move an instance rather than setting fields, and `observed()` gives the
controller's decision core one consistent picture.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hearth.agent.instance import Instance
from hearth.controller.model import Instance as ObservedInstance
from hearth.spec import FunctionSpec


@dataclass
class FunctionState:
    spec: FunctionSpec
    instances: dict[str, Instance] = field(default_factory=dict)
    waiters: collections.deque = field(default_factory=collections.deque)
    # waiters woken to look for a free instance again whose task has not run yet (`wake`): a
    # call started without waiting (`Invoker.start_call`) must not take the instance first
    woken: set = field(default_factory=set)
    starting: int = 0
    last_arrival: float = 0.0
    # arrival times since the last decision tick (the decision core's keep-alive input)
    arrivals: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    cold_start_s: float | None = None  # measured (moving average), for cold-start-aware policies
    service_s: float | None = None  # handler seconds per event, timed in the instance (batching)

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.live]


class InstanceTable:
    def __init__(self) -> None:
        self.functions: dict[str, FunctionState] = {}
        self.pooled: dict[str, Instance] = {}  # generic warm-pool instances, by id
        self.by_eid: dict[int, Instance] = {}  # every instance with a live endpoint

    # -- functions ---------------------------------------------------------------------------
    def get(self, name: str) -> FunctionState | None:
        return self.functions.get(name)

    def current(self, fs: FunctionState) -> FunctionState:
        """The function's state now (a redeploy replaces it while callers hold the old one)."""
        return self.functions.get(fs.spec.name, fs)

    def serve(self, spec: FunctionSpec) -> tuple[FunctionState, FunctionState | None]:
        """Serve `spec` from now on; returns (new state, the replaced one). Waiters carry over:
        new invocations go to new instances while the old ones drain."""
        old = self.functions.get(spec.name)
        fs = FunctionState(
            spec=spec,
            waiters=old.waiters if old else collections.deque(),
            woken=old.woken if old else set(),
        )
        self.functions[spec.name] = fs
        return fs, old

    def ensure(self, spec: FunctionSpec) -> FunctionState:
        """The function's state, created (without starting anything) if not served yet."""
        fs = self.functions.get(spec.name)
        if fs is None:
            fs = self.functions[spec.name] = FunctionState(spec=spec)
        return fs

    def remove(self, name: str) -> FunctionState | None:
        return self.functions.pop(name, None)

    # -- instances ---------------------------------------------------------------------------
    def instances(self) -> Iterator[Instance]:
        """Pool instances, then every function's instances (any state)."""
        yield from list(self.pooled.values())
        for fs in list(self.functions.values()):
            yield from list(fs.instances.values())

    def usage(self, node: str) -> tuple[int, int]:
        """CPU millicores and memory (MiB) held on `node` by the instances `instances()` lists,
        those stopping or dead left out. In plain loops, not through `instances()`: a one-node
        placement check adds this up on every pool start, and the generator's resume per
        instance was most of that check's Python calls (#19)."""
        cpu = mem = 0
        for group in (self.pooled, *[fs.instances for fs in self.functions.values()]):
            for inst in group.values():
                if inst.node == node and inst.state not in ("dead", "stopping"):
                    cpu += inst.cpu_millicores
                    mem += inst.memory_mb
        return cpu, mem

    def find(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances() if i.id == instance_id), None)

    def started(self, inst: Instance) -> None:
        """A new instance exists (state `starting`): the data plane may hear from it."""
        inst.state = "starting"
        self.by_eid[inst.eid] = inst

    def add_pooled(self, inst: Instance) -> None:
        self.pooled[inst.id] = inst

    def drop_pooled(self, inst: Instance) -> None:
        """A pool instance that failed to start is no longer offered (its exit is reported
        later, through `dead`)."""
        self.pooled.pop(inst.id, None)

    def pooled_ready(self, inst: Instance, phases: dict[str, float]) -> None:
        inst.phases = phases
        inst.state = "pooled"

    def free_pooled(self, node: str, instance_id: str | None = None) -> Instance | None:
        """An idle pool instance on `node` (the named one, if given); None if there is none."""
        if instance_id is not None:
            p = self.pooled.get(instance_id)
            return p if p is not None and p.state == "pooled" and p.node == node else None
        return next(
            (i for i in self.pooled.values() if i.state == "pooled" and i.node == node), None
        )

    def specialise(self, inst: Instance, spec: FunctionSpec, instance_id: str | None) -> None:
        """A pool instance becomes an instance of `spec` (state `starting` until it reports)."""
        self.pooled.pop(inst.id, None)
        inst.id = instance_id or inst.id
        inst.function, inst.state, inst.from_pool = spec.name, "starting", True
        inst.memory_mb, inst.cpu_millicores = (
            spec.resources.memory_mb,
            spec.resources.cpu_millicores,
        )
        inst.ready = asyncio.get_running_loop().create_future()

    def ready(self, inst: Instance, keep_s: float) -> None:
        """Started and specialised: idle (busy if its first request went ahead of its report,
        see `claim`), kept `keep_s` until its first invocation."""
        inst.state, inst.last_used = ("busy" if inst.inflight else "idle"), time.time()
        inst.keep_until = inst.last_used + keep_s

    def adopt(self, fs: FunctionState, inst: Instance) -> FunctionState:
        """Count a ready instance among its function's (the current state, after a redeploy)."""
        fs = self.current(fs)
        fs.instances[inst.id] = inst
        return fs

    def claim(self, inst: Instance) -> None:
        """A starting instance gets its first request now, ahead of its ready report (its
        endpoint is registered already, so the request waits in its socket)."""
        inst.inflight += 1

    def ahead(self, function: str) -> int:
        """Requests sent ahead of a ready report (`claim`) to `function`'s starting instances:
        in flight, though those instances are not counted among the function's yet."""
        return sum(
            i.inflight
            for i in self.by_eid.values()
            if i.function == function and i.state == "starting"
        )

    @staticmethod
    def _free(inst: Instance, fs: FunctionState) -> bool:
        return inst.state in ("idle", "busy") and inst.inflight < fs.spec.concurrency

    def has_free(self, fs: FunctionState) -> bool:
        """Whether an instance of the function has a free concurrency slot (nothing taken)."""
        limit = fs.spec.concurrency  # a plain loop: this runs before every invocation
        for i in fs.instances.values():
            if i.inflight < limit and i.state in ("idle", "busy"):
                return True
        return False

    def take(self, fs: FunctionState) -> Instance | None:
        """The most recently used instance with a free concurrency slot, now busy; or None."""
        best = None
        for inst in fs.instances.values():
            if self._free(inst, fs):
                if best is None or inst.last_used > best.last_used:
                    best = inst
        if best is not None:
            best.inflight += 1
            best.state = "busy"
        return best

    def done(self, inst: Instance) -> bool:
        """One invocation on `inst` finished; True if it just went idle."""
        inst.inflight = max(0, inst.inflight - 1)
        inst.served += 1
        inst.last_used = time.time()
        if inst.state == "busy" and inst.inflight == 0:
            inst.state = "idle"
            return True
        return False

    def keep(self, inst: Instance, until: float) -> None:
        inst.keep_until = until

    def stopping(self, inst: Instance) -> None:
        inst.state = "stopping"

    def dead(self, inst: Instance) -> tuple[str, FunctionState | None]:
        """The instance has ended: forget it. Returns (its state before, its function's state)."""
        was, inst.state = inst.state, "dead"
        self.by_eid.pop(inst.eid, None)
        self.pooled.pop(inst.id, None)
        fs = self.functions.get(inst.function or "")
        if fs is not None:
            fs.instances.pop(inst.id, None)
        return was, fs

    # -- views -------------------------------------------------------------------------------
    def joined_owners(self) -> set[tuple[int, int]]:
        """The slot owners (pid, start time) that joined pods say they are, while their join
        connection is open: alive whatever this pid namespace's /proc says (their pid names
        nobody, or another process, here; `SlotPool.reclaim_dead`)."""
        out = set()
        for i in self.by_eid.values():
            claims = getattr(i, "claims", None)
            if claims is not None and i.running:
                out.add(claims)
        return out

    def function_of(self, eid: int) -> str | None:
        inst = self.by_eid.get(eid)
        return inst.function if inst is not None else None

    def observed(self) -> list[ObservedInstance]:
        """Live instances as the controller's decision core sees them."""
        out = []
        for inst in self.instances():
            if inst.state in ("dead", "stopping"):
                continue
            out.append(
                ObservedInstance(
                    id=inst.id,
                    function=inst.function,
                    node=inst.node,
                    state="idle" if inst.state == "pooled" else inst.state,  # type: ignore[arg-type]
                    runtime=inst.runtime,
                    memory_mb=inst.memory_mb,
                    cpu_millicores=inst.cpu_millicores,
                    started_at=inst.started_at,
                    last_used_at=inst.last_used,
                    inflight=inst.inflight,
                    from_pool=inst.from_pool,
                )
            )
        return out

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            name: {
                "instances": [
                    {
                        "id": i.id,
                        "pid": i.pid,
                        "state": i.state,
                        "inflight": i.inflight,
                        "served": i.served,
                        "from_pool": i.from_pool,
                        "node": i.node,
                        "idle_s": round(now - i.last_used, 3),
                    }
                    for i in fs.instances.values()
                ],
                "queued": len(fs.waiters),
                "starting": fs.starting,
            }
            for name, fs in self.functions.items()
        }

    def state_counts(self) -> dict[str, collections.Counter]:
        return {
            name: collections.Counter(i.state for i in fs.instances.values())
            for name, fs in self.functions.items()
        }
