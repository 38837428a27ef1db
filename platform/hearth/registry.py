"""The function registry, kept in Redis so it survives restarts and is shared by every node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.registry")

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
        self._unreadable: set[tuple[bytes, bytes]] = set()  # (name, spec) already reported

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
        for name, v in sorted(raw.items()):
            try:
                specs.append(FunctionSpec.model_validate_json(v))
            except ValueError as e:
                # written by another version (or before a bound was added): skip rather than
                # fail start-up, and say so once per stored value (the sync reads every round)
                if (name, v) not in self._unreadable:
                    self._unreadable.add((name, v))
                    why = "; ".join(
                        f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                        for x in getattr(e, "errors", lambda: [])()
                    )
                    log.warning(
                        "registry: function %s is not served, its stored spec is invalid: %s "
                        "(deploy it again)",
                        name.decode(errors="replace") if isinstance(name, bytes) else name,
                        why or e,
                    )
        if self._unreadable:  # only values still stored: the set stays as small as the registry
            self._unreadable = {k for k in self._unreadable if raw.get(k[0]) == k[1]}
        return specs
