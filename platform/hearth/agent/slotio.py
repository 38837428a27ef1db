"""A call's bytes in shared memory: its payload and metadata written into a slot, its reply
read out of one (`SlotIO`, a mixin of `agent.invoker.Invoker`, whose state it is), and the
pure parts they share (`request_meta`, `reply_fields`). Split from the invoker, which keeps the
call's way (admission, the link, how a call ended and what is counted), so that what a
trigger's payload becomes in a slot and what a reply slot says are read in one place.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from hearth.agent.instance import Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.outcomes import new_invocation_id
from hearth.agent.table import FunctionState
from hearth.batching import update_service_time
from hearth.dataplane.descriptor import NO_SLOT, Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import PayloadTooLarge, PoolExhausted, Slot, payload_offset
from hearth.invoke import InvokeError, InvokeResult
from hearth.runtime.codec import META_RESERVE, error_body, pack_meta, unpack_meta
from hearth.runtime.instance import write_slot


@dataclass
class SlotPayload:
    """A request body the gateway already streamed into a slot at `offset` (one copy: socket → slot)."""

    slot: Slot
    offset: int
    length: int


class SlotIO:
    """`_placed`, `_place`, `_drop` and `_read_reply`; the state is the invoker's."""

    pool: SlotPool
    link: DataplaneLink

    def _placed(
        self,
        payload: bytes | memoryview | SlotPayload,
        meta: dict[str, Any],
        reserve: int = META_RESERVE,
    ) -> tuple[Slot, int, int]:
        """`_place`, its failures as the InvokeError every trigger gets (never a 500); the
        payload's slot is freed when it fails."""
        try:
            return self._place(payload, meta, reserve)
        except PayloadTooLarge as e:
            self._drop(payload)
            raise InvokeError(413, "payload_too_large", str(e)) from None
        except PoolExhausted as e:
            self._drop(payload)
            raise InvokeError(
                429, "no_space", f"shared-memory pool exhausted, retry later: {e}"
            ) from None
        except Exception:
            self._drop(payload)
            raise

    def _place(
        self,
        payload: bytes | memoryview | SlotPayload,
        meta: dict[str, Any],
        reserve: int = META_RESERVE,
    ) -> tuple[Slot, int, int]:
        """The payload and its metadata in a slot: (slot, meta_len, payload length). A payload
        in memory gets its metadata padded to `reserve` bytes, room for `invoke` to rewrite
        the deadline in place after a wait; `start_call` never waits and passes 0: its
        metadata is exactly its msgpack map, which the instance unpacks without the
        `ExtraData` exception a padded one raises (and the agent packs no 512-byte pad)."""
        if isinstance(payload, SlotPayload):
            mb = pack_meta(meta)
            if len(mb) <= payload.offset:
                payload.slot.buf[: len(mb)] = mb
                # declared as long as the reserve, so the payload starts exactly at `offset`
                # (the reader takes the first msgpack object and ignores what follows)
                return payload.slot, payload.offset, payload.length
            # Metadata larger than the reserve (huge headers): copy once more, rarely.
            body = bytes(payload.slot.buf[payload.offset : payload.offset + payload.length])
            self.link.free(payload.slot.index, payload.slot.gen)
            slot, mlen, blen = write_slot(self.pool, meta, body, META_RESERVE)
            return slot, mlen, blen
        slot, mlen, blen = write_slot(self.pool, meta, payload, reserve)
        return slot, mlen, blen

    def _drop(self, payload: Any) -> None:
        if isinstance(payload, SlotPayload):
            self.link.free(payload.slot.index, payload.slot.gen)

    def _read_reply(
        self,
        d: Descriptor,
        inst: Instance,
        cold: bool,
        inv: str,
        t0: float,
        fs: FunctionState | None = None,
        free: bool = True,
    ) -> InvokeResult:
        """The result a reply descriptor carries; its slot freed (unless not `free`: then
        the caller frees it, but it is freed here if it cannot be read)."""
        if d.kind == Kind.ERROR or d.slot == NO_SLOT:
            return InvokeResult(
                status=d.aux or 502,
                body=error_body(
                    "dataplane_error", f"instance replied with error status {d.status}"
                ),
                content_type="application/json",
                instance_id=inst.id,
                cold=cold,
                invocation_id=inv,
            )
        try:
            off = payload_offset(d.meta_len)  # one view (one generation check) for both
            whole = self.pool.view(d.slot, d.gen, off + d.length)
            meta = unpack_meta(whole[: d.meta_len])
            body = bytes(whole[off:])
            del whole
            status, ctype, headers, t = reply_fields(meta)
        except BaseException:
            self.link.free(d.slot, d.gen)
            raise
        if free:
            self.link.free(d.slot, d.gen)
        if fs is not None and t is not None:  # the handler's own time (queueing excluded)
            fs.service_s = update_service_time(fs.service_s, t, 1)
        return InvokeResult(
            status=status,
            body=body,
            content_type=ctype,
            headers=headers,
            instance_id=inst.id,
            cold=cold,
            invocation_id=inv,
            duration_s=time.monotonic() - t0,
        )


def reply_fields(meta: Any) -> tuple[int, str, dict[str, Any], float | None]:
    """A reply's status, content type, headers and handler time (`t`), checked: a function's
    reply whose fields HTTP cannot carry (a content type or header name that is not text, a
    status or time that is not a number) is a 502 `bad_reply` on every path, never a 500, a
    lost answer or a slot left unfreed."""
    try:
        status = int(meta.get("status", 200))
        t = float(meta["t"]) if "t" in meta else None
        ctype = meta.get("content_type") or "application/octet-stream"
        headers = meta.get("headers") or {}
        if not isinstance(ctype, str) or not isinstance(headers, dict):
            raise TypeError("not text")
        if headers and not all(isinstance(k, str) for k in headers):
            raise TypeError("not text")
    except (AttributeError, TypeError, ValueError, OverflowError):
        raise InvokeError(
            502,
            "bad_reply",
            "the function's reply has a status, content type or header name HTTP cannot carry",
        ) from None
    return status, ctype, headers, t


def request_meta(
    function: str,
    content_type: str,
    headers: dict[str, str] | None,
    timeout: float,
    idempotency_key: str | None,
    invocation_id: str | None,
) -> tuple[bytes, str, dict[str, Any]]:
    """A call's correlation id, invocation id and slot metadata."""
    if invocation_id is None:
        corr, inv = new_invocation_id()
    else:
        # never derived from the caller's id: two events with the same id (a retried stream
        # entry, a client reusing ids) must not share a correlation id and cross replies
        inv, corr = invocation_id, os.urandom(16)
    meta = {
        "function": function,
        "content_type": content_type,
        "headers": headers or {},
        "deadline": time.time() + timeout,
        "idempotency_key": idempotency_key,
        "invocation_id": inv,
    }
    return corr, inv, meta
