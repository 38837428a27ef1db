"""The function registry, kept in Redis so it survives restarts and is shared by every node."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from hearth.spec import FunctionSpec

KEY = "hearth:functions"
LOAD_KEY = "hearth:load"  # + ":<node>": a hash function -> {"inflight", "queued", "t"} (JSON)


class Registry:
    def __init__(self, r: aioredis.Redis):
        self.r = r

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
