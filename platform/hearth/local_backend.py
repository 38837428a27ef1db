"""The local backend: the controller's Backend protocol carried out by the node agent with real
processes on this machine (several nodes can be simulated: HEARTH_NODES). The Kubernetes backend
(hearth.controller.k8s) implements the same protocol and passes the same contract tests."""

from __future__ import annotations

from hearth.controller.backend import InstanceHandle
from hearth.controller.model import Instance, Node
from hearth.node import NodeAgent
from hearth.spec import FunctionSpec


class LocalBackend:
    def __init__(self, agent: NodeAgent):
        self.agent = agent

    async def nodes(self) -> list[Node]:
        return list(self.agent.nodes)

    async def start_instance(
        self,
        spec: FunctionSpec | None,
        node: str,
        instance_id: str,
        from_pool: str | None = None,
        runtime: str | None = None,
    ) -> InstanceHandle:
        if node not in {n.name for n in self.agent.nodes}:
            raise ValueError(f"unknown node {node!r}")
        if any(i.id == instance_id for i in self.agent.observed()):
            raise ValueError(f"instance id {instance_id!r} already exists")
        if spec is None:
            if not runtime:
                raise ValueError("a pool instance needs a runtime")
            inst = await self.agent.start_pool_instance(node, instance_id)
            return InstanceHandle(inst.id, None, node, inst.runtime, False, phases=inst.phases)
        self.agent.serve(spec)  # an instance of a function the agent does not serve yet
        inst = await self.agent.start_instance(
            spec,
            node=node,
            instance_id=instance_id,
            from_pool=from_pool,
            use_pool=from_pool is not None,
        )
        return InstanceHandle(
            inst.id, spec.name, node, inst.runtime, inst.from_pool, phases=inst.phases
        )

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> None:
        await self.agent.stop_instance(instance_id, graceful)

    async def instances(self) -> list[Instance]:
        return self.agent.observed()
