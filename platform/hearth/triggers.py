"""Runs the queue side of a node: one StreamTriggerRunner per declared Redis-stream trigger of every
deployed function, plus one per function for its async HTTP invocations; and the gateway hooks
(async enqueue, result lookup, publish) built on the same machinery."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis

from hearth.invoke import InvokeError, Invoker
from hearth.queue.async_invoke import async_trigger, enqueue_invocation, get_invocation
from hearth.queue.consumer import StreamTriggerRunner
from hearth.queue.producer import handle_publish
from hearth.queue.stats import forget_trigger
from hearth.queue.wire import PublishError
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.triggers")


class QueueService:
    def __init__(
        self,
        redis_url: str,
        invoker: Invoker,
        *,
        node: str = "local",
        result_ttl: int = 3600,
        max_backlog: int | None = 10_000,
    ):
        self.redis_url = redis_url
        self.invoker = invoker
        self.node = node
        self.result_ttl = result_ttl
        self.max_backlog = max_backlog
        self.runners: dict[str, list[StreamTriggerRunner]] = {}
        self.r: aioredis.Redis | None = None

    async def start(self, specs: list[FunctionSpec]) -> None:
        self.r = aioredis.Redis.from_url(self.redis_url)
        for spec in specs:
            await self.add(spec)

    async def add(self, spec: FunctionSpec) -> None:
        await self.remove(spec.name)
        triggers = [
            async_trigger(
                spec.name,
                max_inflight=max(1, spec.max_instances * spec.concurrency),
                max_deliveries=1,
            ),
            *spec.stream_triggers(),
        ]
        runners = []
        for i, t in enumerate(triggers):
            runner = StreamTriggerRunner(
                self.redis_url,
                spec.name,
                t,
                self.invoker,
                consumer_name=f"{self.node}-{spec.name}",
                invoke_timeout=spec.timeout_s,
                delete_acked=i == 0,  # the async stream is the platform's own
            )
            await runner.start()
            runners.append(runner)
        self.runners[spec.name] = runners

    async def remove(self, name: str, forget: bool = False) -> None:
        for runner in self.runners.pop(name, []):
            await runner.stop()
            if forget and self.r is not None:  # deleted: `hearth queues` stops listing it
                await forget_trigger(self.r, runner.stream, runner.group)

    def triggers(self) -> dict[str, list[tuple[str, str]]]:
        """function -> the (stream, group) pairs it consumes (its async stream included)."""
        return {name: [(x.stream, x.group) for x in rs] for name, rs in self.runners.items()}

    async def stop(self) -> None:
        """Stop every runner at once. Each one's stop waits for its reader's blocked read
        (`StreamTriggerRunner.block_ms`, 0.5 s) and its in-flight invocations; one runner after
        another (until 7 Dec 2026) that added up at a node's shutdown: 4.8 s for test_e2e.py's
        node with its dozen functions (and their async streams)."""
        runners = [r for rs in self.runners.values() for r in rs]
        self.runners.clear()
        try:
            for res in await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True):
                if isinstance(res, BaseException):
                    raise res
        finally:  # (a runner's failed stop does not leave the Redis client open)
            if self.r is not None:
                await self.r.aclose()
                self.r = None

    # -- gateway hooks ---------------------------------------------------------------------
    def gateway_hooks(self) -> dict[str, Any]:
        async def enqueue(
            name: str, body: bytes, ctype: str, headers: dict[str, str], callback: str | None
        ) -> str:
            assert self.r is not None
            try:
                return await enqueue_invocation(
                    self.r,
                    name,
                    body,
                    ctype,
                    headers,
                    callback_url=callback,
                    ttl=self.result_ttl,
                    max_backlog=self.max_backlog,
                )
            except PublishError as e:  # 413 payload_too_large / 400, as a publish answers
                raise InvokeError(e.status, e.error, str(e)) from None

        async def lookup(inv: str) -> dict[str, Any] | None:
            assert self.r is not None
            rec = await get_invocation(self.r, inv)
            if rec is None:
                return None
            out = rec.to_dict()
            if rec.body:
                ct = (rec.content_type or "").split(";")[0]
                if ct == "application/json" or ct.startswith("text/"):
                    try:
                        import json

                        out["result"] = (
                            json.loads(rec.body) if ct == "application/json" else rec.body.decode()
                        )
                    except ValueError:
                        out["result_hex"] = rec.body.hex()
                else:
                    out["result_hex"] = rec.body[:1_000_000].hex()
            return out

        async def publish(stream: str, body: bytes, ctype: str) -> str:
            assert self.r is not None
            try:
                return await handle_publish(self.r, stream, body, ctype)
            except PublishError as e:  # 400 / 413 with the queue's own error code
                raise InvokeError(e.status, e.error, str(e)) from None

        async def on_deploy(spec: FunctionSpec) -> None:
            await self.add(spec)

        async def on_delete(name: str) -> None:
            await self.remove(name, forget=True)

        return {
            "enqueue": enqueue,
            "lookup": lookup,
            "publish": publish,
            "on_deploy": on_deploy,
            "on_delete": on_delete,
        }
