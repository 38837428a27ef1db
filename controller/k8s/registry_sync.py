"""Function resources -> the function registry the node agents serve from.

Node agents follow the registry in Redis (`hearth.registry`, re-read every second) and serve
what it holds; on Kubernetes the `Function` resource is the source of truth, so the controller
writes each valid spec there (same encoding as the admin API) and removes the ones it wrote
whose Function is gone. Functions deployed through the admin API are left alone: the names the
controller owns are kept in their own set, per namespace.
"""

from __future__ import annotations

import json

import redis
from hearth.registry import KEY
from hearth.spec import FunctionSpec


class RegistrySync:
    def __init__(self, redis_url: str, namespace: str) -> None:
        self.r = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.owned_key = f"{KEY}:k8s:{namespace}"

    def sync(self, specs: dict[str, FunctionSpec]) -> tuple[list[str], list[str]]:
        """Write changed specs, delete owned ones that are gone; (written, deleted)."""
        owned = {m.decode() for m in self.r.smembers(self.owned_key)}
        names = sorted(specs)
        current = self.r.hmget(KEY, names) if names else []
        written = []
        pipe = self.r.pipeline()
        for name, old in zip(names, current, strict=True):
            body = json.dumps(specs[name].to_dict())
            if old is None or old.decode() != body:
                pipe.hset(KEY, name, body)
                written.append(name)
            if name not in owned:
                pipe.sadd(self.owned_key, name)
        deleted = sorted(owned - set(specs))
        for name in deleted:
            pipe.hdel(KEY, name)
            pipe.srem(self.owned_key, name)
        pipe.execute()
        return written, deleted

    def close(self) -> None:
        self.r.close()
