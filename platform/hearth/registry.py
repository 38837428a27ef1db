"""The function registry, kept in Redis so it survives restarts and is shared by every node."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from hearth.spec import FunctionSpec

KEY = "hearth:functions"
LOAD_KEY = "hearth:load"  # + ":<node>": a hash function -> {"inflight", "queued", "t"} (JSON)


class Registry:
    def __init__(self, r: aioredis.Redis):
        self.r = r
        # Changes this process makes to the registry *and* to what it serves (the admin API's
        # deploy/delete) and each step of the registry sync exclude each other (`lock`): a step
        # awaits for seconds (a cold start, a drain), and a change in between would be undone
        # by its second half (a deleted function's triggers started, a v2 given v1's). A sync
        # round whose read of the registry is older than a change (`generation`) stops; the
        # next round reads again.
        self.generation = 0
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """An admin change: waits for the sync step in progress."""
        async with self.lock:
            self.generation += 1
            yield

    @contextlib.asynccontextmanager
    async def sync_step(self, generation: int) -> AsyncIterator[bool]:
        """One step of the registry sync, no admin change during it; yields whether a read of
        the registry taken at `generation` still describes what is served."""
        async with self.lock:
            yield self.generation == generation

    async def put(self, spec: FunctionSpec) -> None:
        await self.r.hset(KEY, spec.name, json.dumps(spec.to_dict()))

    async def get(self, name: str) -> FunctionSpec | None:
        raw = await self.r.hget(KEY, name)
        return FunctionSpec.model_validate_json(raw) if raw else None

    async def delete(self, name: str) -> bool:
        return bool(await self.r.hdel(KEY, name))

    async def all(self) -> list[FunctionSpec]:
        raw = await self.r.hgetall(KEY)
        specs = []
        for _, v in sorted(raw.items()):
            try:
                specs.append(FunctionSpec.model_validate_json(v))
            except ValueError:
                continue  # written by an incompatible version: skip rather than fail start-up
        return specs
