"""What happens to each entry a stream trigger read: its invocation, alone or in a batch, and
how its delivery ends (acked, retried after a backoff, or dead-lettered).

Why apart from the reading (`consumer.StreamTriggerRunner`): the runner decides *which* entries
come in (new ones, its own after a restart, idle ones taken over) and keeps the held ones from
being taken; `Deliveries` holds them while they run and applies the delivery rules (docs/queues.md).
How an outcome counts is `wire.failure` (pure); `settle.Settler` writes the end to Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from hearth.invoke import BatchItem, Invoker, InvokeResult
from hearth.queue.pending import PendingEntries
from hearth.queue.redis_retry import net_retry
from hearth.queue.settle import AsyncOutcome, RunnerStats, Settler
from hearth.queue.wire import Decoded, MalformedEntry, backoff_delay, decode_entry, failure
from hearth.spec import StreamTrigger

log = logging.getLogger("hearth.queue")


@dataclass
class _Held:
    fields: dict[bytes, bytes]
    deliveries: int
    since: float = field(default_factory=time.monotonic)


class Deliveries:
    """The entries one runner holds (`held`), how many run (`inflight`, bounded by the trigger's
    max_inflight through `wait_capacity`), and their tasks and retries."""

    def __init__(
        self,
        function: str,
        stream: str,
        trigger: StreamTrigger,
        invoker: Invoker,
        invoke_timeout: float | None,
        stats: RunnerStats,
        pel: PendingEntries,
        settler: Settler,
        stopping: asyncio.Event,
    ):
        self.function = function
        self.stream = stream
        self.trigger = trigger
        self.invoker = invoker
        self.invoke_timeout = invoke_timeout
        self.stats = stats
        self.pel = pel
        self.settler = settler
        self.stopping = stopping
        self.held: dict[str, _Held] = {}
        self.undelivered: dict[str, int] = {}  # entry -> attempts the platform could not place
        self.inflight = 0
        self.free = asyncio.Event()
        self.free.set()
        self.tasks: set[asyncio.Task] = set()
        self.waiting: set[asyncio.Task] = set()  # sleeping until a retry
        # a backlog goes to the invoker in batches when it can carry them (the node agent)
        self.batched = trigger.invoke_batch > 1 and hasattr(invoker, "invoke_batch")

    async def wait_capacity(self) -> None:
        while self.inflight >= self.trigger.max_inflight and not self.stopping.is_set():
            self.free.clear()
            await self.free.wait()

    def dispatch(self, eid: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        self.held[eid] = _Held(fields, deliveries)
        self.inflight += 1
        self.stats.delivered += 1
        t = asyncio.create_task(self._process(eid, fields, deliveries))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def forget(self, eid: str) -> None:
        self.held.pop(eid, None)
        self.undelivered.pop(eid, None)

    def release(self, n: int = 1) -> None:
        self.inflight -= n
        self.free.set()

    def dispatch_batch(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """First deliveries read together: one task, one `invoke_batch` (retries go one by one)."""
        for eid, fields in entries:
            self.held[eid] = _Held(fields, 1)
        self.inflight += len(entries)
        self.stats.delivered += len(entries)
        t = asyncio.create_task(self._process_batch(entries))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _process(self, eid: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        try:
            await self._process_one(eid, fields, deliveries)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. the group was deleted under us; the entry stays pending
            log.error("%s: processing %s failed: %s: %s", self.stream, eid, type(e).__name__, e)
            self.forget(eid)
        finally:
            self.release()

    async def _process_batch(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        settled: set[str] = set()
        try:
            ready: list[tuple[str, dict[bytes, bytes], Decoded, dict[str, str]]] = []
            for eid, fields in entries:
                prep = await self._prepare(eid, fields, 1)
                if prep is None:
                    settled.add(eid)
                else:
                    ready.append((eid, fields, *prep))
            items = [
                BatchItem(dec.data, dec.content_type, headers, eid, dec.invocation_id)
                for eid, _f, dec, headers in ready
            ]
            try:
                outs: list[Any] = await self.invoker.invoke_batch(  # type: ignore[attr-defined]
                    self.function,
                    items,
                    timeout=self.invoke_timeout,
                    max_batch=self.trigger.invoke_batch,
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an invoker bug must not kill the consumer
                outs = [e] * len(items)
            for (eid, fields, dec, _h), out in zip(ready, outs, strict=True):
                await self._settle(eid, fields, 1, dec, out)
                settled.add(eid)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. the group was deleted under us; the entries stay pending
            log.error("%s: processing a batch failed: %s: %s", self.stream, type(e).__name__, e)
            for eid, _f in entries:
                if eid not in settled:
                    self.forget(eid)
        finally:
            self.release(len(entries))

    async def _prepare(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int
    ) -> tuple[Decoded, dict[str, str]] | None:
        """Decode an entry and its invocation headers; None when it went to the DLQ instead."""
        try:
            dec = decode_entry(fields)
        except MalformedEntry as e:
            self.stats.malformed += 1
            await self.settler.dead_letter(eid, fields, str(e), deliveries, "malformed", None)
            return None
        if deliveries > self.trigger.max_deliveries:
            msg = (
                f"delivery {deliveries} exceeds max_deliveries {self.trigger.max_deliveries}: "
                "the consumers that received it stopped before finishing (crash or hang)"
            )
            await self.settler.dead_letter(eid, fields, msg, deliveries, "exhausted", dec)
            return None
        if dec.reply and dec.invocation_id:
            await self.settler.mark_running(dec, deliveries)
        headers = {
            **dec.headers,
            "x-hearth-stream": self.stream,
            "x-hearth-entry-id": eid,
            "x-hearth-delivery": str(deliveries),
        }
        return dec, headers

    async def _process_one(self, eid: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        prep = await self._prepare(eid, fields, deliveries)
        if prep is None:
            return
        dec, headers = prep
        outcome: InvokeResult | BaseException
        try:
            outcome = await self.invoker.invoke(
                self.function,
                dec.data,
                content_type=dec.content_type,
                headers=headers,
                idempotency_key=eid,
                invocation_id=dec.invocation_id,
                timeout=self.invoke_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # InvokeError, or an invoker bug (must not kill the consumer)
            outcome = e
        await self._settle(eid, fields, deliveries, dec, outcome)

    async def _settle(
        self,
        eid: str,
        fields: dict[bytes, bytes],
        deliveries: int,
        dec: Decoded,
        outcome: InvokeResult | BaseException,
    ) -> None:
        """Ack a success; retry or dead-letter a failure (the one place delivery rules live)."""
        err, count_it = failure(outcome)
        if err is None:
            assert isinstance(outcome, InvokeResult)
            res = outcome
            self.stats.succeeded += 1
            if dec.reply and dec.invocation_id:
                outcome = AsyncOutcome(
                    "succeeded", res.status, bytes(res.body), res.content_type, None
                )
                await self.settler.finish_async(dec, deliveries, outcome)
            self.settler.ack(eid)
            return
        self.stats.failed += 1
        if count_it and deliveries >= self.trigger.max_deliveries:
            await self.settler.dead_letter(eid, fields, err, deliveries, "failed", dec)
            return
        log.info(
            "%s: %s delivery %d failed (%s); retrying", self.stream, eid, deliveries, err[:200]
        )
        if not count_it:
            self.undelivered[eid] = self.undelivered.get(eid, 0) + 1
        self._schedule_retry(eid, fields, deliveries, count_it)

    def _schedule_retry(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int, count_it: bool
    ) -> None:
        t = asyncio.create_task(self._retry(eid, fields, deliveries, count_it))
        self.waiting.add(t)
        t.add_done_callback(self.waiting.discard)

    async def _retry(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int, count_it: bool
    ) -> None:
        assert self.pel.r is not None
        self.stats.retried += 1
        attempts = deliveries + self.undelivered.get(eid, 0)  # keeps growing in an outage
        await asyncio.sleep(
            backoff_delay(attempts, self.trigger.backoff_s, self.trigger.backoff_max_s)
        )
        await self.wait_capacity()
        if self.stopping.is_set():
            self.forget(eid)
            return

        try:
            ok, value = await self._net_retry(
                "retry claim", lambda _a: self.pel.take_back(eid, count_it)
            )
        except ResponseError as e:  # NOGROUP: the stream or group was deleted meanwhile
            log.warning("%s: cannot re-claim %s for a retry: %s", self.stream, eid, e)
            ok, value = False, None
        got, row = value if ok else ([], None)
        if not got:
            self.forget(eid)
            return
        n = int(row["times_delivered"]) + (1 if count_it else 0)
        f = got[0][1] if count_it else fields
        if f is None:  # deleted from the stream (XDEL) while pending: nothing to deliver
            self.forget(eid)
            self.settler.ack(eid)
            return
        self.dispatch(eid, f, n)

    async def _net_retry(self, what: str, fn: Any) -> tuple[bool, Any]:
        return await net_retry(self.stream, self.stopping, what, fn)
