"""The protocol both backends implement (local processes, Kubernetes pods), the in-memory
reference backend the contract tests are checked against (as Fission tests its drivers against
its in-memory statestore), and `execute`, which carries the decision core's actions out.

Contract (see tests/controller/backend_contract.py):
  nodes()                       the nodes instances can be placed on (capacity = allocatable)
  start_instance(spec, node, instance_id, from_pool=None, runtime=None) -> InstanceHandle
      spec None starts a generic warm-pool instance of `runtime`; from_pool names a pool
      instance to specialise instead of starting from nothing. Unknown node or a duplicate id
      raise ValueError.
  stop_instance(instance_id, graceful=True)   idempotent: unknown ids are ignored
  instances()                   every instance that exists and is not yet gone
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hearth.controller.model import Action, Instance, Node, Prewarm, Start, Stop
from hearth.spec import FunctionSpec


@dataclass
class InstanceHandle:
    id: str
    function: str | None
    node: str
    runtime: str
    from_pool: bool = False
    address: str | None = None  # backend specific (socket path, pod IP)
    phases: dict[str, float] = field(default_factory=dict)  # cold-start phase timestamps


@runtime_checkable
class Backend(Protocol):
    async def nodes(self) -> list[Node]: ...

    async def start_instance(
        self,
        spec: FunctionSpec | None,
        node: str,
        instance_id: str,
        from_pool: str | None = None,
        runtime: str | None = None,
    ) -> InstanceHandle: ...

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> None: ...

    async def instances(self) -> list[Instance]: ...


class MemoryBackend:
    """Reference backend: instances are records; starting one makes it idle at once."""

    def __init__(self, nodes: Iterable[Node], clock=None) -> None:
        self._nodes = {n.name: n for n in nodes}
        self._inst: dict[str, Instance] = {}
        self._clock = clock or (lambda: 0.0)

    async def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    async def start_instance(
        self, spec, node, instance_id, from_pool=None, runtime=None
    ) -> InstanceHandle:
        if node not in self._nodes:
            raise ValueError(f"unknown node {node!r}")
        if instance_id in self._inst:
            raise ValueError(f"instance id {instance_id!r} already exists")
        if spec is None and not runtime:
            raise ValueError("a pool instance needs a runtime")
        pooled = False
        if from_pool is not None:
            p = self._inst.get(from_pool)
            if p is None or p.function is not None or p.node != node:
                raise ValueError(
                    f"pool instance {from_pool!r} is not an idle pool instance on {node!r}"
                )
            del self._inst[from_pool]
            pooled = True
        now = self._clock()
        rt = spec.runtime if spec is not None else str(runtime)
        self._inst[instance_id] = Instance(
            id=instance_id,
            function=spec.name if spec is not None else None,
            node=node,
            state="idle",
            runtime=rt,
            memory_mb=spec.resources.memory_mb if spec else 128,
            cpu_millicores=spec.resources.cpu_millicores if spec else 100,
            started_at=now,
            last_used_at=now,
            from_pool=pooled,
        )
        return InstanceHandle(instance_id, spec.name if spec else None, node, rt, pooled)

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> None:
        self._inst.pop(instance_id, None)

    async def instances(self) -> list[Instance]:
        return list(self._inst.values())


async def execute(
    backend: Backend, actions: Iterable[Action], specs: Mapping[str, FunctionSpec]
) -> list[InstanceHandle]:
    """Carry out Start/Stop/Prewarm in order; Keep and Buffer are for the gateway/observers."""
    started = []
    for a in actions:
        if isinstance(a, Start):
            started.append(
                await backend.start_instance(specs[a.function], a.node, a.instance_id, a.from_pool)
            )
        elif isinstance(a, Prewarm):
            started.append(
                await backend.start_instance(None, a.node, a.instance_id, runtime=a.runtime)
            )
        elif isinstance(a, Stop):
            await backend.stop_instance(a.instance_id)
    return started
