"""The invocation front: slots, deadlines, replies, batching and chained-call routing.

Every trigger (HTTP gateway, Redis streams, replay) calls `invoke`/`invoke_batch`; the payload
goes into a shared-memory slot once, the admitter picks an instance, the link carries the
descriptor and brings the reply back. Chained calls from instances (`route`) pass the same slot
on, not a copy.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hearth.agent.admitter import Admitter
from hearth.agent.instance import AGENT_ID, Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.table import FunctionState, InstanceTable
from hearth.batching import batch_sizes, update_service_time
from hearth.dataplane.descriptor import NO_SLOT, PROXY_ID, Descriptor, Flags, Kind, Status, new_corr
from hearth.dataplane.shm import (
    PayloadTooLarge,
    PoolExhausted,
    Slot,
    SlotPool,
    StaleSlot,
    payload_offset,
)
from hearth.invoke import (
    BatchItem,
    InvokeError,
    InvokeResult,
    InvokeTimeout,
    UnknownFunction,
    invoke_item,
)
from hearth.metrics import Metrics
from hearth.runtime.codec import META_RESERVE, error_body, pack_meta, unpack_meta
from hearth.runtime.instance import write_slot

#: sees an instance's reply descriptor in the reader callback: (reply, instance id, cold,
#: invocation id); it must not keep the slot
ReplyHook = Callable[[Descriptor, str, bool, str], None]


@dataclass
class SlotPayload:
    """A request body the gateway already streamed into a slot at `offset` (one copy: socket → slot)."""

    slot: Slot
    offset: int
    length: int


class Invoker:
    def __init__(
        self,
        pool: SlotPool,
        table: InstanceTable,
        admitter: Admitter,
        link: DataplaneLink,
        metrics: Metrics,
        kill: Callable[[Instance, str], None],
        emit: Callable[[str, bytes, str, dict[str, Any], dict[str, Any]], Awaitable[str]]
        | None = None,
    ) -> None:
        self.pool = pool
        self.table = table
        self.admitter = admitter
        self.link = link
        self.metrics = metrics
        self.kill = kill  # an instance that overran its deadline is killed (it may be stuck)
        self.emit = emit  # ctx.emit from an instance: the agent publishes (it holds Redis)
        self.start_budget_s = 30.0  # longest wait for an instance (queueing + cold start)
        # a chained call to a function hosted on another node: (fs, d, meta) -> handled?
        self.remote: Callable[[FunctionState, Descriptor, dict], Any] | None = None
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def invoke(
        self,
        function: str,
        payload: bytes | memoryview | SlotPayload,
        *,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: float | None = None,
        on_reply: ReplyHook | None = None,
        received_at: float | None = None,
    ) -> InvokeResult:
        """``on_reply(reply descriptor, instance id, cold, invocation id)`` sees the instance's
        reply in the reader callback, before this resumes (a forwarded call sends it on)."""
        t0 = time.monotonic()
        fs = self.table.get(function)
        if fs is None:
            self._drop(payload)
            raise UnknownFunction(function)
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
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
        try:
            slot, meta_len, length = self._place(payload, meta)
        except PayloadTooLarge as e:  # the same answer for every trigger, never a 500
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
        try:
            # The function's timeout covers execution (as Lambda's does); waiting for a free or
            # freshly started instance is bounded separately by the start budget.
            inst, cold = await self.admitter.acquire(
                fs, t0 + timeout + self.start_budget_s, received_at
            )
        except BaseException:
            self.link.free(slot.index, slot.gen)
            raise
        if time.monotonic() - t0 > 0.005:  # waited: the handler's deadline starts at dispatch
            meta["deadline"] = time.time() + timeout
            mb = pack_meta(meta, meta_len)
            if len(mb) == meta_len:
                self.pool.view(slot.index, slot.gen, meta_len)[:] = mb
        t_dispatch = time.monotonic()
        d = slot.descriptor(inst.eid, AGENT_ID, length=length, meta_len=meta_len, corr=corr)
        ahead = _ahead(inst)
        try:
            hook = None if on_reply is None else lambda r: on_reply(r, inst.id, cold, inv)
            reply = await self.link.call(
                inst, d, t_dispatch + timeout - time.monotonic(), ahead, hook
            )
        except TimeoutError:
            if timeout >= fs.spec.timeout_s:
                self.kill(inst, "timeout")  # over the function's own limit: it may be stuck
                self.pool.release_if_owner(slot.index, slot.gen)  # never adopted: ours to free
            else:
                # only the caller's shorter ?timeout= ran out: the instance is fine and keeps
                # working (killing it would let any client stop instances at will); its late
                # reply frees the slot and the instance's capacity
                self.link.abandon(inst, bytes(d.corr))
            self._count(function, 504, "timeout", t0)
            raise InvokeTimeout(function, timeout) from None
        except InvokeError as e:
            # The instance died before adopting the request slot: free it, or it leaks.
            self.pool.release_if_owner(slot.index, slot.gen)
            e = _start_error(ahead) or e  # sent ahead of a start that failed: say so
            self._count(function, e.status, e.error, t0)
            raise e from None
        if reply.kind == Kind.ERROR:
            err = dataplane_error(reply)
            if reply.src == PROXY_ID:  # bounced by the proxy: the request slot is still ours
                self.pool.release_if_owner(slot.index, slot.gen)
            self._count(function, err.status, err.error, t0)
            raise err
        res = self._read_reply(reply, inst, cold, inv, t0, fs)
        self._count(function, res.status, "handler_error" if res.status >= 400 else "", t0)
        return res

    async def invoke_batch(
        self,
        function: str,
        items: list[BatchItem],
        *,
        timeout: float | None = None,
        max_batch: int = 32,
    ) -> list[InvokeResult | InvokeError]:
        """Several events for one function (a queue trigger's backlog): fast functions get them
        in batches, one round trip per instance (hearth.batching decides); every event still
        gets its own handler call and outcome, in order."""
        fs = self.table.get(function)
        if fs is None:
            return [UnknownFunction(function) for _ in items]
        ready = sum(
            i.state in ("idle", "busy") and i.inflight < fs.spec.concurrency
            for i in fs.instances.values()
        )
        sizes = batch_sizes(len(items), fs.service_s, fs.spec.timeout_s, ready, max_batch)
        chunks, at = [], 0
        for k in sizes:
            chunks.append(items[at : at + k])
            at += k
        outs = await asyncio.gather(*(self._invoke_chunk(function, c, timeout) for c in chunks))
        return [r for out in outs for r in out]

    async def _invoke_chunk(
        self, function: str, items: list[BatchItem], timeout: float | None
    ) -> list[InvokeResult | InvokeError]:
        if len(items) > 1:
            try:
                return await self._invoke_batched(function, items, timeout)
            except (PayloadTooLarge, PoolExhausted):
                pass  # too big together: one by one, so each event gets its own precise answer
        return [await invoke_item(self, function, it, timeout) for it in items]

    async def _invoke_batched(
        self, function: str, items: list[BatchItem], timeout: float | None
    ) -> list[InvokeResult | InvokeError]:
        """One slot `[meta with a row per event][payloads back to back]`, one descriptor with
        Flags.BATCH; the reply has the same shape. Raises PayloadTooLarge/PoolExhausted before
        anything was sent."""
        t0 = time.monotonic()
        fs = self.table.get(function)
        if fs is None:
            return [UnknownFunction(function) for _ in items]
        timeout = min(timeout or fs.spec.timeout_s, fs.spec.timeout_s)
        invs = [it.invocation_id or new_invocation_id()[1] for it in items]
        rows = [
            [it.content_type, it.headers or {}, it.idempotency_key, inv, len(it.payload)]
            for it, inv in zip(items, invs, strict=True)
        ]
        meta = {"function": function, "deadline": time.time() + timeout, "batch": rows}
        slot, meta_len, length = write_slot(self.pool, meta, b"".join(it.payload for it in items))
        n = len(items)
        try:
            inst, cold = await self.admitter.acquire(fs, t0 + timeout + self.start_budget_s)
        except InvokeError as e:
            self.link.free(slot.index, slot.gen)
            return [e] * n
        except BaseException:
            self.link.free(slot.index, slot.gen)
            raise
        self.metrics.batches.labels(function).inc()
        self.metrics.batched_events.labels(function).inc(n)
        d = slot.descriptor(
            inst.eid,
            AGENT_ID,
            length=length,
            meta_len=meta_len,
            corr=os.urandom(16),
            flags=Flags.BATCH,
        )
        ahead = _ahead(inst)
        try:
            reply = await self.link.call(inst, d, timeout, ahead)
        except TimeoutError:
            self.kill(inst, "timeout")
            self.pool.release_if_owner(slot.index, slot.gen)
            for _ in items:
                self._count(function, 504, "timeout", t0)
            return [InvokeTimeout(function, timeout) for _ in items]
        except InvokeError as e:
            self.pool.release_if_owner(slot.index, slot.gen)
            e = _start_error(ahead) or e
            for _ in items:
                self._count(function, e.status, e.error, t0)
            return [e] * n
        try:
            results = self._read_batch_reply(reply, inst, cold, invs, t0, fs)
        except (ValueError, TypeError, StaleSlot) as e:  # an instance speaking another protocol
            err = InvokeError(502, "bad_reply", f"instance {inst.id}: {e}")
            for _ in items:
                self._count(function, 502, "bad_reply", t0)
            return [err] * n
        for r in results:
            self._count(function, r.status, "handler_error" if r.status >= 400 else "", t0)
        return list(results)

    def _read_batch_reply(
        self,
        d: Descriptor,
        inst: Instance,
        cold: bool,
        invs: list[str],
        t0: float,
        fs: FunctionState,
    ) -> list[InvokeResult]:
        if d.kind == Kind.ERROR or d.slot == NO_SLOT:
            return [self._read_reply(d, inst, cold, inv, t0) for inv in invs]
        try:
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            body = self.pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len))
            rows = meta.get("batch") or []
            if len(rows) != len(invs):
                raise ValueError(f"batch reply has {len(rows)} results for {len(invs)} events")
            if "t" in meta:
                fs.service_s = update_service_time(fs.service_s, float(meta["t"]), len(rows))
            out, at, dt = [], 0, time.monotonic() - t0
            for (status, ctype, headers, n), inv in zip(rows, invs, strict=True):
                out.append(
                    InvokeResult(
                        status=int(status),
                        body=bytes(body[at : at + n]),
                        content_type=ctype or "application/octet-stream",
                        headers=headers or {},
                        instance_id=inst.id,
                        cold=cold,
                        invocation_id=inv,
                        duration_s=dt,
                    )
                )
                at += n
            return out
        finally:
            self.link.free(d.slot, d.gen)

    def _place(
        self, payload: bytes | memoryview | SlotPayload, meta: dict[str, Any]
    ) -> tuple[Slot, int, int]:
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
        slot, mlen, blen = write_slot(self.pool, meta, payload, META_RESERVE)
        return slot, mlen, blen

    def _drop(self, payload: Any) -> None:
        if isinstance(payload, SlotPayload):
            self.link.free(payload.slot.index, payload.slot.gen)

    def _free(self, slot: int, gen: int) -> None:
        try:
            self.pool.release(slot, gen)
        except StaleSlot:
            pass

    def _read_reply(
        self,
        d: Descriptor,
        inst: Instance,
        cold: bool,
        inv: str,
        t0: float,
        fs: FunctionState | None = None,
    ) -> InvokeResult:
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
            meta = unpack_meta(self.pool.view(d.slot, d.gen, d.meta_len))
            body = bytes(self.pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len)))
        finally:
            self.link.free(d.slot, d.gen)
        if fs is not None and "t" in meta:  # the handler's own time (queueing excluded)
            fs.service_s = update_service_time(fs.service_s, float(meta["t"]), 1)
        return InvokeResult(
            status=int(meta.get("status", 200)),
            body=body,
            content_type=meta.get("content_type") or "application/octet-stream",
            headers=meta.get("headers") or {},
            instance_id=inst.id,
            cold=cold,
            invocation_id=inv,
            duration_s=time.monotonic() - t0,
        )

    def _count(self, function: str, status: int, error: str, t0: float) -> None:
        key = (function, status)
        child = self._children.get(key)
        if child is None:  # labels() costs microseconds on every call: keep the children
            child = self._children[key] = (
                self.metrics.invocations.labels(function, str(status)),
                self.metrics.latency.labels(function),
            )
        child[0].inc()
        child[1].observe(time.monotonic() - t0)
        if status >= 400:
            self.metrics.errors.labels(function, error or "error").inc()

    async def route(self, d: Descriptor) -> None:
        """A chained call from an instance: pick the target's instance and forward the same slot.
        The target's invoke token applies as it does over HTTP; the call gets the target's
        timeout here too (the caller may be gone or stuck)."""
        key = bytes(d.corr)
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


def _ahead(inst: Instance) -> asyncio.Future | None:
    """A starting instance's `ready` when the request goes ahead of its report (the admitter
    handed it over early), else None: the call's timeout then runs from the report."""
    return inst.ready if inst.state == "starting" and inst.ready is not None else None


def _start_error(ready: asyncio.Future | None) -> InvokeError | None:
    """Why the start a request was sent ahead of failed (None if it did not)."""
    if ready is None or not ready.done() or ready.cancelled():
        return None
    e = ready.exception()
    return e if isinstance(e, InvokeError) else None


def dataplane_error(d: Descriptor) -> InvokeError:
    """What an ERROR descriptor answering a call means for the caller. Overload is
    back-pressure (503 + Retry-After: a full proxy queue, or no slot free for the reply right
    now), never a 502 or a 507; a reply that can never fit is the function's error."""
    if d.src == PROXY_ID and d.status == Status.QUEUE_FULL:
        return InvokeError(503, "busy", "the instance's queue is full; retry", retry_after=1)
    if d.src == PROXY_ID:
        return InvokeError(
            502, "dataplane_error", f"the proxy could not deliver (status {d.status})"
        )
    if d.aux == 507:
        return InvokeError(
            503, "no_space", "no shared-memory slot free for the reply; retry", retry_after=1
        )
    if d.aux == 413:
        return InvokeError(502, "reply_too_large", "the reply does not fit the largest slot")
    status = d.aux if 400 <= d.aux <= 599 else 502
    return InvokeError(status, "dataplane_error", f"instance replied with error status {d.status}")


def new_invocation_id() -> tuple[bytes, str]:
    """A random (version 4) UUID as (16 bytes, canonical text), without uuid.UUID's overhead
    (this runs on every invocation)."""
    b = new_corr()
    h = b.hex()
    return b, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
