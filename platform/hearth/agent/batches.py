"""Several events for one function in one round trip (a queue trigger's backlog): the batch
path of the invoker (`agent.invoker.Invoker` holds it as a mixin; the state is the invoker's).

One slot `[meta with a row per event][payloads back to back]` goes to one instance with
Flags.BATCH; the reply has the same shape; every event still gets its own handler call and
outcome, in order. Fast functions get batches (`hearth.batching` decides), slow ones one by one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from hearth.agent.admitter import Admitter
from hearth.agent.instance import AGENT_ID, Instance
from hearth.agent.link import DataplaneLink
from hearth.agent.outcomes import ahead_of, new_invocation_id, start_error
from hearth.agent.table import FunctionState, InstanceTable
from hearth.batching import batch_sizes, update_service_time
from hearth.dataplane.descriptor import NO_SLOT, Descriptor, Flags, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import PayloadTooLarge, PoolExhausted, StaleSlot, payload_offset
from hearth.invoke import (
    BatchItem,
    InvokeError,
    InvokeResult,
    InvokeTimeout,
    UnknownFunction,
    invoke_item,
)
from hearth.metrics import Metrics
from hearth.runtime.codec import unpack_meta
from hearth.runtime.instance import write_slot


class Batches:
    """`invoke_batch` and its parts (see the module docstring)."""

    pool: SlotPool
    table: InstanceTable
    admitter: Admitter
    link: DataplaneLink
    metrics: Metrics
    kill: Callable[[Instance, str], None]
    start_budget_s: float

    # also used: `_count` and `_read_reply` of `agent.invoker.Invoker`

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
        ahead = ahead_of(inst)
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
            e = start_error(ahead, e) or e
            for _ in items:
                self._count(function, e.status, e.error, t0)
            return [e] * n
        if reply.kind == Kind.ERROR or (reply.slot, reply.gen) != (slot.index, slot.gen):
            # answered elsewhere: the request slot is done with (a no-op if it was released)
            self.pool.release_if_owner(slot.index, slot.gen)
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
