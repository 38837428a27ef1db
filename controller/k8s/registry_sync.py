"""Function resources -> the function registry the node agents serve from.

Node agents follow the registry in Redis (`hearth.registry`, re-read every second) and serve
what it holds; on Kubernetes the `Function` resource is the source of truth, so the controller
writes each valid spec there (same encoding as the admin API) and removes the ones it wrote
whose Function is gone. Functions deployed through the admin API are left alone: the names the
controller owns are kept in their own set, per namespace.
"""

from __future__ import annotations

import json
import time

import redis
from hearth.controller.model import FunctionLoad
from hearth.registry import KEY, LOAD_KEY
from hearth.spec import FunctionSpec


class RegistrySync:
    def __init__(self, redis_url: str, namespace: str) -> None:
        self.r = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.owned_key = f"{KEY}:k8s:{namespace}"

    def sync(
        self, specs: dict[str, FunctionSpec], keep: set[str] | frozenset[str] = frozenset()
    ) -> tuple[list[str], list[str]]:
        """Write changed specs, delete owned ones that are gone (but not those in `keep`: their
        Function exists, its state could not be read this time); (written, deleted)."""
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
        deleted = sorted(owned - set(specs) - set(keep))
        for name in deleted:
            pipe.hdel(KEY, name)
            pipe.srem(self.owned_key, name)
        pipe.execute()
        return written, deleted

    def close(self) -> None:
        self.r.close()


class LoadReader:
    """`loads(function) -> FunctionLoad`: the node agents' published load (`hearth:load:<node>`,
    written every second by each agent, `hearth.agent.loadpub`) summed over the nodes (stream
    lag and pending: the largest report, as every node sees the same consumer group). Read once per `max_age_s`, so a
    reconcile over many functions costs one scan."""

    def __init__(self, redis_url: str, max_age_s: float = 0.5, clock=time.monotonic) -> None:
        self.r = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.max_age_s = max_age_s
        self.clock = clock
        self._at = float("-inf")
        self._loads: dict[str, FunctionLoad] = {}

    def refresh(self) -> dict[str, FunctionLoad]:
        out: dict[str, FunctionLoad] = {}
        for key in self.r.scan_iter(match=f"{LOAD_KEY}:*", count=100):
            for fn, raw in self.r.hgetall(key).items():
                try:
                    v = json.loads(raw)
                    name = fn.decode()
                    ld = out.setdefault(name, FunctionLoad(name))
                    ld.inflight += int(v.get("inflight", 0))
                    ld.queued += int(v.get("queued", 0))
                    # the consumer group is shared by every node: its lag once, not per node
                    ld.stream_lag = max(ld.stream_lag, int(v.get("lag", 0)))
                    ld.stream_pending = max(ld.stream_pending, int(v.get("pending", 0)))
                except (ValueError, TypeError, AttributeError):
                    continue  # a malformed entry is skipped, not fatal
        self._loads, self._at = out, self.clock()
        return out

    def __call__(self, function: str) -> FunctionLoad | None:
        if self.clock() - self._at > self.max_age_s:
            try:
                self.refresh()
            except redis.RedisError:
                return None  # no load known: the autoscaler sees what the pods say
        return self._loads.get(function)

    def close(self) -> None:
        self.r.close()
