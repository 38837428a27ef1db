"""The node agent: the local backend. It starts, reuses and stops instances on this machine,
routes every invocation to them over the shared-memory data plane, bounds queues, scales idle
instances in after their keep-alive, and never stops an instance in the middle of work.

`NodeAgent` is a thin facade over the parts in :mod:`hearth.agent`, each with one job:

    InstanceTable  the only writer of the instance state machine; `observed()`
    Admitter       a free instance per invocation, or a bounded queue, or 429
    DataplaneLink  the endpoint, pending calls, outbox and reader
    Invoker        slots, deadlines, replies, batching, chained-call routing
    Runner         start, specialise, stop, watch instances (ZygoteRunner: forked from the
                   node's pre-imported fork server; ProcessRunner: a new interpreter each)
    Lifecycle      starts, placement, warm pool, keep-alive ticks, stops
    ColdStartLog   cold-start phase records

It implements :class:`hearth.invoke.Invoker` for all triggers (HTTP gateway, Redis streams,
replay) and routes chained calls between instances (the payload slot is passed on, not copied).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.coldstarts import ColdStartLog
from hearth.agent.instance import AGENT_ID, POOL_RUNTIME, Instance, InstanceDied, ProcessInstance
from hearth.agent.invoker import Done, Invoker, ReplyHook, SlotPayload, new_invocation_id
from hearth.agent.lifecycle import Lifecycle, local_nodes
from hearth.agent.link import DataplaneLink
from hearth.agent.runner import ProcessRunner, Runner
from hearth.agent.spin import ReplySpin
from hearth.agent.spin_policy import SpinConfig
from hearth.agent.table import FunctionState, InstanceTable
from hearth.agent.zygote import ZygoteRunner
from hearth.agent.zygote_wait import (
    FORK_TIMEOUT_S,
    ZYGOTE_RETRY_S,
    ZYGOTE_WAIT_MAX_S,
    ZYGOTE_WAIT_S,
)
from hearth.controller.keepalive import PolicySet
from hearth.controller.model import Instance as ObservedInstance
from hearth.controller.model import Node
from hearth.dataplane.shm import SlotPool
from hearth.invoke import BatchItem, InvokeError, InvokeResult, invoke_item
from hearth.metrics import Metrics
from hearth.spec import FunctionSpec

InstanceProc = ProcessInstance  # the name before the split

__all__ = [
    "AGENT_ID",
    "POOL_RUNTIME",
    "FunctionState",
    "Instance",
    "InstanceDied",
    "InstanceProc",
    "NodeAgent",
    "SlotPayload",
    "new_invocation_id",
]


class NodeAgent:
    def __init__(
        self,
        pool: SlotPool,
        proxy_socket: str,
        *,
        node: str = "local",
        redis_url: str | None = None,
        log_dir: Path | None = None,
        metrics: Metrics | None = None,
        warm_pool_size: int = 0,
        on_cold_start: Callable[[dict[str, Any]], None] | None = None,
        nodes: list[Node] | None = None,
        policies: PolicySet | None = None,
        runner: Runner | None = None,
        max_queue_wait_s: float | None = None,
        runner_kind: str = "zygote",
        zygote_preload: list[str] | None = None,
        zygote_wait_s: float = ZYGOTE_WAIT_S,
        zygote_wait_max_s: float = ZYGOTE_WAIT_MAX_S,
        zygote_fork_timeout_s: float = FORK_TIMEOUT_S,
        zygote_retry_s: float = ZYGOTE_RETRY_S,
        spin: SpinConfig | None = None,
        start_timeout_s: float | None = None,
    ):
        self.pool = pool
        self.proxy_socket = proxy_socket
        self.node = node
        self.metrics = metrics or Metrics()
        # Simulated nodes share this machine's data plane; placement and capacity are real decisions.
        self.nodes = nodes or local_nodes(node)
        self.policies = policies or PolicySet()
        self.table = InstanceTable()
        self.link = DataplaneLink(pool, proxy_socket)
        if spin is not None and spin.cap_s > 0:  # busy-polls for lone replies (off by default)
            self.link.spin = ReplySpin(spin, self.link.pending.__len__, self.metrics)
        self.coldstarts = ColdStartLog(self.metrics, on_cold_start)
        self.lifecycle = Lifecycle(
            pool=pool,
            table=self.table,
            link=self.link,
            metrics=self.metrics,
            coldstarts=self.coldstarts,
            nodes=self.nodes,
            policies=self.policies,
            warm_pool_size=warm_pool_size,
        )
        if start_timeout_s is not None:  # (default: `agent.starts.START_TIMEOUT_S`)
            self.lifecycle.start_timeout_s = start_timeout_s
        where = {
            "pool_name": pool.name,
            "proxy_socket": proxy_socket,
            "log_dir": log_dir,
            "on_started": self.table.started,
            "on_exit": self.lifecycle.exited,
        }
        if runner is None:
            runner = (
                ZygoteRunner(
                    self.link,
                    preload=zygote_preload,
                    deployed=self.deployed,
                    wait_s=zygote_wait_s,
                    wait_max_s=zygote_wait_max_s,
                    fork_timeout_s=zygote_fork_timeout_s,
                    retry_s=zygote_retry_s,
                    **where,
                )
                if runner_kind == "zygote"
                else ProcessRunner(self.link, **where)
            )
        self.runner: Runner = runner
        self.admitter = Admitter(self.table, self.lifecycle.begin_start, self.lifecycle.arrived)
        self.admitter.max_queue_wait_s = max_queue_wait_s
        self.admitter.plan_start = self.lifecycle.plan_now
        self.admitter.begin_now = self.lifecycle.start_now
        self.lifecycle.runner = self.runner
        self.lifecycle.admitter = self.admitter
        self.invoker = Invoker(
            pool,
            self.table,
            self.admitter,
            self.link,
            self.metrics,
            self.lifecycle.kill,
            emit=self._emit if redis_url else None,
        )
        self._redis_url = redis_url
        self._redis: Any = None
        self.link.on_done = self.lifecycle.done
        self.link.on_report = self.lifecycle.reported
        self.link.on_invoke = self.invoker.route
        self.link.instance_of = self.table.by_eid.get
        self.cluster: Any = None  # a hearth.cluster.member.Member once this node has peers
        self.forwarder: Any = None

    def join(self, member: Any) -> None:
        """Become one node of many: invocations and chained calls of functions hosted on other
        nodes are forwarded there (hearth.cluster); minimum instances only where hosted."""
        from hearth.cluster.forward import Forwarder

        self.forwarder = Forwarder(
            member, self.pool, self.link, self.invoker._count, self.invoker.start_budget_s
        )
        self.cluster = member
        self.invoker.remote = self._chain_remote
        self.lifecycle.hosted = member.hosts_here

    def leave(self) -> None:
        self.cluster = self.forwarder = self.invoker.remote = None
        self.lifecycle.hosted = lambda name: True

    async def _chain_remote(self, fs: FunctionState, d: Any, meta: dict) -> bool:
        node = self.cluster.target(fs.spec.name) if self.cluster is not None else None
        if node is None:
            return False
        await self.forwarder.chain(node, fs.spec, d, meta)
        return True

    def deployed(self) -> list[FunctionSpec]:
        return [fs.spec for fs in self.table.functions.values()]

    def ready_counts(self) -> dict[str, int]:
        """Functions with instances ready to serve (for the peer registry and the front)."""
        out = {}
        for name, fs in self.table.functions.items():
            n = sum(i.state in ("idle", "busy") for i in fs.instances.values())
            if n:
                out[name] = n
        return out

    # -- what the gateway, triggers and backend read ---------------------------------------------
    @property
    def functions(self) -> dict[str, FunctionState]:
        return self.table.functions

    @property
    def pooled(self) -> dict[str, Instance]:
        return self.table.pooled

    @property
    def by_eid(self) -> dict[int, Instance]:
        return self.table.by_eid

    @property
    def mode(self) -> str:
        return self.link.mode

    @property
    def cold_starts(self) -> list[dict[str, Any]]:
        return self.coldstarts.records

    @property
    def warm_pool_size(self) -> int:
        return self.lifecycle.warm_pool_size

    @property
    def start_budget_s(self) -> float:
        return self.invoker.start_budget_s

    @start_budget_s.setter
    def start_budget_s(self, v: float) -> None:
        self.invoker.start_budget_s = v

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> NodeAgent:
        await self.link.open()
        self.metrics.dataplane_mode.labels(self.mode).set(1)
        self.runner.start()
        self.lifecycle.run()
        return self

    async def close(self) -> None:
        await self.lifecycle.close()
        await self.link.close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _emit(
        self, stream: str, body: bytes, ctype: str, headers: dict[str, str], meta: dict[str, Any]
    ) -> str:
        """ctx.emit of an instance: published here, so function code needs no Redis access."""
        from hearth.queue.producer import publish

        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(self._redis_url)
        return await publish(self._redis, stream, body, ctype, {"headers": headers, **meta})

    # -- registry --------------------------------------------------------------------------------
    async def deploy(self, spec: FunctionSpec) -> None:
        await self.lifecycle.deploy(spec)

    async def undeploy(self, name: str) -> bool:
        return await self.lifecycle.undeploy(name)

    def serve(self, spec: FunctionSpec) -> FunctionState:
        """Serve `spec` without starting instances (the controller starts them)."""
        return self.lifecycle.serve(spec)

    # -- invocation ------------------------------------------------------------------------------
    async def invoke(
        self,
        function: str,
        payload: bytes | memoryview | SlotPayload,
        *,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: float | None = None,
        forward: bool = True,
        on_reply: ReplyHook | None = None,
        received_at: float | None = None,
    ) -> InvokeResult:
        """Invoke `function` here or on the node hosting it. `received_at`: when the gateway
        read the request (monotonic): the node's wait bound counts from there."""
        if forward and self.cluster is not None:
            node = self.cluster.target(function)
            if node is not None:  # hosted on another node: the payload goes there, slot to slot
                fs = self.table.get(function)
                return await self.forwarder.invoke(
                    node,
                    function,
                    payload,
                    spec=fs.spec if fs is not None else None,
                    content_type=content_type,
                    headers=headers,
                    idempotency_key=idempotency_key,
                    invocation_id=invocation_id,
                    timeout=timeout,
                )
        return await self.invoker.invoke(
            function,
            payload,
            content_type=content_type,
            headers=headers,
            idempotency_key=idempotency_key,
            invocation_id=invocation_id,
            timeout=timeout,
            on_reply=on_reply,
            received_at=received_at,
        )

    def forward_now(
        self,
        function: str,
        payload: bytes,
        *,
        content_type: str,
        headers: dict[str, str] | None,
        timeout: float | None,
        done: Callable[[InvokeResult | InvokeError], None],
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
    ) -> bool:
        """Start `function`'s invocation on the node hosting it without a task (a small body
        read into memory): `done` gets its result or error from the callback that settles it.
        False, nothing started, when it runs here or its link would wait: then `invoke`."""
        if self.cluster is None:
            return False
        node = self.cluster.target(function)
        if node is None:
            return False
        fs = self.table.get(function)
        return self.forwarder.start(
            node,
            function,
            payload,
            spec=fs.spec if fs is not None else None,
            content_type=content_type,
            headers=headers,
            idempotency_key=idempotency_key,
            invocation_id=invocation_id,
            timeout=timeout,
            done=done,
        )

    def start_call(
        self,
        function: str,
        payload: bytes | memoryview | SlotPayload,
        *,
        done: Done,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: float | None = None,
        forward: bool = True,
        on_reply: ReplyHook | None = None,
    ) -> bool:
        """`invoke` started from a protocol callback: a local instance free now
        (`Invoker.start_call`: its contract), or a small in-memory body to the node hosting the
        function (`forward_now`, unless `forward` is False: a peer's forwarded call runs here).
        False when the call would wait: then `await invoke(...)`."""
        if forward and self.cluster is not None and self.cluster.target(function) is not None:
            return isinstance(payload, bytes) and self.forward_now(
                function,
                payload,
                content_type=content_type,
                headers=headers,
                idempotency_key=idempotency_key,
                invocation_id=invocation_id,
                timeout=timeout,
                done=done,
            )
        return self.invoker.start_call(
            function,
            payload,
            done=done,
            content_type=content_type,
            headers=headers,
            idempotency_key=idempotency_key,
            invocation_id=invocation_id,
            timeout=timeout,
            on_reply=on_reply,
        )

    async def invoke_batch(
        self,
        function: str,
        items: list[BatchItem],
        *,
        timeout: float | None = None,
        max_batch: int = 32,
    ) -> list[InvokeResult | InvokeError]:
        if self.cluster is not None and self.cluster.target(function) is not None:
            return list(
                await asyncio.gather(*(invoke_item(self, function, it, timeout) for it in items))
            )
        return await self.invoker.invoke_batch(
            function, items, timeout=timeout, max_batch=max_batch
        )

    # -- instances -------------------------------------------------------------------------------
    async def start_instance(
        self,
        spec: FunctionSpec,
        *,
        node: str | None = None,
        use_pool: bool = True,
        instance_id: str | None = None,
        from_pool: str | None = None,
    ) -> Instance:
        return await self.lifecycle.start_instance(
            spec, node=node, use_pool=use_pool, instance_id=instance_id, from_pool=from_pool
        )

    async def start_pool_instance(self, node: str, instance_id: str | None = None) -> Instance:
        return await self.lifecycle.start_pool_instance(node, instance_id)

    async def stop_instance(self, instance_id: str, graceful: bool = True) -> bool:
        return await self.lifecycle.stop_instance(instance_id, graceful)

    async def place(self, spec: FunctionSpec) -> str:
        return await self.lifecycle.place(spec)

    def observed(self) -> list[ObservedInstance]:
        return self.table.observed()

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "dataplane": self.mode,
            "pool": self.pool.stats(),
            "warm_pool": len(self.table.pooled),
            "warm_pool_ready": sum(i.state == "pooled" for i in self.table.pooled.values()),
            "runner": getattr(self.runner, "kind", type(self.runner).__name__),
            "zygotes": self.runner.status(),
            "cluster": self.cluster.status() if self.cluster is not None else None,
            "functions": self.table.status(),
            "ticks": self.lifecycle.ticks,
        }
