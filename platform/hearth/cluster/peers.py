"""The peer registry: every node agent announces itself in Redis with a heartbeat (link address,
data-plane mode, functions with ready instances, free capacity) and reads the others'.

Each record is a key with a TTL (``hearth:peer:<node>``), so a node that stops beating disappears
by itself; a set indexes the names (members whose key expired are pruned on read). A restarted
node announces a new ``boot`` id, which tells its peers to drop links to the old process.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("hearth.cluster.peers")

PEER_KEY = "hearth:peer:"
PEER_SET = "hearth:peers"


@dataclass
class Peer:
    """What one node agent says about itself."""

    node: str
    link: str  # host:port of its agent-to-agent link ("" when the link is off)
    http: str  # base URL of its gateway
    dataplane: str = "unknown"
    ready: dict[str, int] = field(default_factory=dict)  # function -> instances ready to serve
    deployed: list[str] = field(default_factory=list)  # functions it knows (registry sync lags)
    free_cpu_millicores: int = 0
    free_memory_mb: int = 0
    cpu_millicores: int = 0
    memory_mb: int = 0
    boot: str = ""
    at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Peer:
        d = json.loads(raw)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def new_boot_id() -> str:
    return uuid.uuid4().hex[:12]


class PeerRegistry:
    """Announce this node and list the live ones (a thin shell over an async Redis client)."""

    def __init__(self, redis: Any, ttl_s: float = 3.0):
        self.r = redis
        self.ttl_ms = max(100, int(ttl_s * 1000))

    async def announce(self, me: Peer) -> None:
        me.at = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(PEER_KEY + me.node, me.to_json(), px=self.ttl_ms)
        pipe.sadd(PEER_SET, me.node)
        await pipe.execute()

    async def withdraw(self, node: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(PEER_KEY + node)
        pipe.srem(PEER_SET, node)
        await pipe.execute()

    async def live(self) -> dict[str, Peer]:
        names = sorted(
            n.decode() if isinstance(n, bytes) else n for n in await self.r.smembers(PEER_SET)
        )
        if not names:
            return {}
        raws = await self.r.mget([PEER_KEY + n for n in names])
        out, gone = {}, []
        for n, raw in zip(names, raws, strict=True):
            if raw is None:
                gone.append(n)
                continue
            try:
                out[n] = Peer.from_json(raw)
            except (ValueError, TypeError) as e:
                log.warning("ignoring malformed peer record of %s: %s", n, e)
        if gone:
            await self.r.srem(PEER_SET, *gone)
        return out
