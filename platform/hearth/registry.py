"""The function registry, kept in Redis so it survives restarts and is shared by every node."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import redis.asyncio as aioredis

from hearth.spec import FunctionSpec

KEY = "hearth:functions"
LOAD_KEY = "hearth:load"  # + ":<node>": a hash function -> {"inflight", "queued", "t"} (JSON)


class Registry:
    def __init__(self, r: aioredis.Redis):
        self.r = r
        # Changes this process makes to the registry *and* to what it serves (the admin API's
        # deploy/delete): the registry sync drops a round whose read of the registry is older
        # than one of them, rather than act on it (it would deploy a just-deleted function
        # again). Nothing waits on anything: the next round reads again.
        self.generation = 0
        self.changing_now = 0

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        self.generation += 1
        self.changing_now += 1
        try:
            yield
        finally:
            self.changing_now -= 1
            self.generation += 1

    def stale(self, generation: int) -> bool:
        """Whether a read taken at `generation` may no longer describe what is served."""
        return self.changing_now > 0 or self.generation != generation

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
