"""Where a forwarded call's bytes land on this node: a request's payload, read off the link
straight into a fresh slot of the node's pool (`SlotLanding`, the link server's sink), and a
reply's body, for a chained call's caller to read in place (`ReplySlot`). Apart from the member
(membership, routing, forwarding) because they are the data plane's side of the link."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import PayloadTooLarge, PoolExhausted, payload_offset
from hearth.invoke import InvokeError
from hearth.runtime.codec import META_RESERVE, pack_meta


class SlotLanding:
    """A forwarded request's payload lands in a fresh slot of this node's pool."""

    def __init__(self, pool: SlotPool):
        from hearth.agent.invoker import SlotPayload  # the agent's handle for a streamed body

        self.pool, self.handle = pool, SlotPayload

    def __call__(self, n: int) -> tuple[memoryview, Any, Callable[[], None]]:
        off = payload_offset(META_RESERVE)
        try:
            slot = self.pool.alloc(off + max(n, 1))
        except PayloadTooLarge as e:
            raise InvokeError(413, "payload_too_large", str(e)) from None
        except PoolExhausted as e:
            raise InvokeError(429, "no_space", f"shared-memory pool exhausted: {e}") from None
        return (
            slot.buf[off : off + n],
            self.handle(slot=slot, offset=off, length=n),
            lambda: self.pool.release(slot.index, slot.gen),
        )


class ReplySlot:
    """A reply body received straight into a slot (for a chained call's caller to read)."""

    def __init__(self, pool: SlotPool, meta: dict[str, Any], n: int):
        self.pool = pool
        mb = pack_meta(
            {
                "status": int(meta.get("status", 200)),
                "content_type": meta.get("content_type") or "application/octet-stream",
                "headers": meta.get("headers") or {},
            }
        )
        off = payload_offset(len(mb))
        try:
            self.slot = pool.alloc(off + max(n, 1))
        except PayloadTooLarge as e:
            raise InvokeError(413, "payload_too_large", str(e)) from None
        except PoolExhausted as e:
            raise InvokeError(429, "no_space", f"shared-memory pool exhausted: {e}") from None
        self.slot.buf[: len(mb)] = mb
        self.meta_len, self.length = len(mb), n
        self.view = self.slot.buf[off : off + n]

    def release_slot(self) -> None:
        try:
            self.pool.release(self.slot.index, self.slot.gen)
        except Exception:
            pass
