"""Chained calls from instances (`ctx.invoke`, `ctx.emit`): the invoker's routing of a descriptor
an instance sent to the agent (`agent.invoker.Invoker` holds it as a mixin; the state is the
invoker's). The same slot goes on to the target's instance, not a copy."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.instance import AGENT_ID, Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.table import FunctionState, InstanceTable
from hearth.dataplane.descriptor import Descriptor, Flags, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import StaleSlot, payload_offset
from hearth.invoke import InvokeError, UnknownFunction
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import write_slot


class Chained:
    """`route` (a chained call) and `_emit` (an instance's publish)."""

    pool: SlotPool
    table: InstanceTable
    admitter: Admitter
    link: DataplaneLink
    emit: Callable[[str, bytes, str, dict[str, Any], dict[str, Any]], Awaitable[str]] | None
    remote: Callable[[FunctionState, Descriptor, dict], Any] | None
    kill: Callable[[Instance, str], None]

    async def route(self, d: Descriptor) -> None:
        """A chained call from an instance: pick the target's instance and forward the same slot.
        The target's invoke token applies as it does over HTTP; the call gets the target's
        timeout here too (the caller may be gone or stuck)."""
        key = bytes(d.corr)
        try:
            caller = self.table.by_eid.get(d.src)
            mine = self.link.lendable(d, caller.ident if caller is not None else None)
        except StaleSlot:
            await self.link.send_error(d.src, key, 410, "stale slot")
            return
        if not mine:  # another call's slot, or the agent's: neither read, sent on nor freed
            await self.link.send_error(d.src, key, 400, "bad chained call: not the caller's slot")
            return
        try:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            if "emit" in meta:
                await self._emit(d, meta)
                return
            fs = self.table.get(meta.get("function", ""))
            if fs is None:
                raise UnknownFunction(meta.get("function", ""))
            want = fs.spec.invoke_token
            got = meta.get("token")
            if want and not (
                isinstance(got, str) and hmac.compare_digest(got.encode(), want.encode())
            ):
                raise InvokeError(
                    403 if got else 401,
                    "forbidden" if got else "unauthorized",
                    f"function {fs.spec.name!r} needs its invoke token: ctx.invoke(..., token=...)",
                )
            if self.remote is not None and await self.remote(fs, d, meta):
                return  # forwarded to the node that hosts it
            inst, _ = await self.admitter.acquire(fs, time.monotonic() + fs.spec.timeout_s)
        except InvokeError as e:
            if not d.flags & Flags.BORROWED:  # a lent buffer stays with its owner
                self.link.free(d.slot, d.gen)
            await self.link.send_error(d.src, key, e.status, e.detail)
            return
        except StaleSlot:
            await self.link.send_error(d.src, key, 410, "stale slot")
            return
        except Exception as e:  # unreadable metadata: answer the caller now, free the slot
            if not d.flags & Flags.BORROWED:
                self.link.free(d.slot, d.gen)
            await self.link.send_error(
                d.src, key, 400, f"bad chained call: {type(e).__name__}: {e}"
            )
            return
        await self.link.forward(inst, d, fs.spec.timeout_s, self.kill)

    async def _emit(self, d: Descriptor, meta: dict[str, Any]) -> None:
        key = bytes(d.corr)
        try:
            body = bytes(self.pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len)))
        finally:
            if not d.flags & Flags.BORROWED:
                self.link.free(d.slot, d.gen)
        if self.emit is None:
            await self.link.send_error(d.src, key, 501, "this node has no Redis to emit to")
            return
        try:
            entry = await self.emit(
                str(meta["emit"]),
                body,
                str(meta.get("content_type") or "application/octet-stream"),
                dict(meta.get("headers") or {}),
                dict(meta.get("meta") or {}),
            )
        except Exception as e:  # PublishError (400/413) or Redis trouble (503)
            status = getattr(e, "status", 503)
            await self.link.send_error(d.src, key, status, f"emit failed: {e}")
            return
        slot, mlen, blen = write_slot(self.pool, {"status": 200}, entry.encode())
        await self.link.send(
            Descriptor(
                dst=d.src,
                src=AGENT_ID,
                slot=slot.index,
                gen=slot.gen,
                length=blen,
                meta_len=mlen,
                kind=Kind.REPLY,
                corr=key,
            )
        )
