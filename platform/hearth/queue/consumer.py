"""The stream trigger: Redis Streams consumer groups -> Invoker, at least once, nothing lost.

Delivery rules (docs/queues.md has the full story):
- an entry is XACKed only after the invocation succeeded (2xx); acks are batched, never early;
- a failed entry stays in this consumer's PEL and is re-delivered after an exponential backoff by
  XCLAIMing it again, which bumps the PEL delivery count: that durable count is what
  `max_deliveries` is checked against, so it survives consumer crashes;
- after `max_deliveries` the entry goes to the dead-letter stream (error text, deliveries,
  original fields, function) and is XACKed in the same MULTI/EXEC;
- entries held by a consumer that stopped (idle > claim_idle_s) are taken over with XAUTOCLAIM;
  a live runner refreshes the idle time of the entries it holds so it is never robbed;
- malformed entries go to the DLQ with the reason; connection loss -> reconnect with backoff;
  stop() lets in-flight invocations finish and flushes their acks.

This module reads, claims and runs entries and decides what happens to each; how an outcome
counts is `wire.failure` (pure), and `settle.Settler` writes the end of each delivery to Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hearth.invoke import BatchItem, Invoker, InvokeResult
from hearth.queue.keys import TRIGGERS_KEY, trigger_field
from hearth.queue.pending import PendingEntries, sid
from hearth.queue.redis_retry import NET_ERRORS, net_retry
from hearth.queue.settle import AsyncOutcome, RunnerStats, Settler
from hearth.queue.wire import (
    Decoded,
    MalformedEntry,
    backoff_delay,
    decode_entry,
    default_group,
    dlq_name,
    failure,
)
from hearth.spec import StreamTrigger

log = logging.getLogger("hearth.queue")


@dataclass
class _Held:
    fields: dict[bytes, bytes]
    deliveries: int
    since: float = field(default_factory=time.monotonic)


class StreamTriggerRunner:
    """Consume one stream trigger of one function on behalf of `consumer_name`."""

    def __init__(
        self,
        redis_url: str,
        function_name: str,
        trigger: StreamTrigger,
        invoker: Invoker,
        consumer_name: str | None = None,
        *,
        dlq_stream: str | None = None,
        block_ms: int = 500,
        invoke_timeout: float | None = None,
        start_id: str = "0",
        callback_attempts: int = 5,
        callback_backoff_s: float = 0.2,
        delete_acked: bool = False,
    ):
        self.redis_url = redis_url
        self.function = function_name
        self.trigger = trigger
        self.invoker = invoker
        self.stream = trigger.stream
        self.group = trigger.group or default_group(function_name)
        self.consumer = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.dlq = dlq_name(self.stream, dlq_stream or getattr(trigger, "dead_letter", None))
        self.block_ms = block_ms
        self.invoke_timeout = invoke_timeout
        self.start_id = start_id
        self.stats = RunnerStats()
        self._r: aioredis.Redis | None = None  # commands
        self._rd: aioredis.Redis | None = None  # the blocking XREADGROUP
        self._held: dict[str, _Held] = {}
        self._undelivered: dict[str, int] = {}  # entry -> attempts the platform could not place
        self._inflight = 0
        self._free = asyncio.Event()
        self._free.set()
        self._tasks: set[asyncio.Task] = set()
        self._waiting: set[asyncio.Task] = set()  # sleeping until a retry
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._settler = Settler(
            self.function,
            self.stream,
            self.group,
            self.dlq,
            self.stats,
            self._stopping,
            self._forget,
            lambda: self._stopping.is_set() and not self._tasks,
            # a stream only this runner reads (async invocations): acked entries are deleted, so
            # it holds only what waits or runs (their results live in their own expiring hashes)
            delete_acked=delete_acked,
            callback_attempts=callback_attempts,
            callback_backoff_s=callback_backoff_s,
        )
        self._pel = PendingEntries(self.stream, self.group, self.consumer)
        self.ready = asyncio.Event()  # set once the group exists and reading started
        # a backlog goes to the invoker in batches when it can carry them (the node agent)
        self._batched = trigger.invoke_batch > 1 and hasattr(invoker, "invoke_batch")

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> StreamTriggerRunner:
        kw: dict[str, Any] = {"socket_connect_timeout": 2.0}
        if not self.redis_url.startswith("unix:"):  # a unix socket has no TCP keepalive
            kw["socket_keepalive"] = True
        self._r = aioredis.Redis.from_url(self.redis_url, socket_timeout=10.0, **kw)
        self._rd = aioredis.Redis.from_url(
            self.redis_url, socket_timeout=self.block_ms / 1000 + 10.0, **kw
        )
        self._settler.start(self._r)
        self._pel.r = self._r
        self._loops = [
            asyncio.create_task(self._read_loop(), name=f"read:{self.stream}"),
            asyncio.create_task(self._reclaim_loop(), name=f"reclaim:{self.stream}"),
            asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat:{self.stream}"),
        ]
        return self

    async def stop(self, timeout: float | None = 60.0) -> None:
        """Stop reading, let in-flight invocations finish, flush acks. Entries waiting for a
        retry stay in the PEL (another consumer, or this one after restart, re-delivers them)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._free.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for t in list(self._waiting):
            t.cancel()
        await asyncio.gather(*self._waiting, return_exceptions=True)
        if self._tasks:
            done, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for t in pending:
                log.warning(
                    "%s: invocation still running at stop timeout; its entry stays pending",
                    self.stream,
                )
                t.cancel()
        await self._settler.stop(timeout)
        for c in (self._r, self._rd):
            if c is not None:
                await c.aclose()

    async def __aenter__(self) -> StreamTriggerRunner:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def held(self) -> int:
        return len(self._held)

    # --- setup ----------------------------------------------------------------------------------

    async def _setup(self) -> None:
        assert self._r is not None
        try:
            await self._r.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        info = {
            "function": self.function,
            "stream": self.stream,
            "group": self.group,
            "dlq": self.dlq,
        }
        await self._r.hset(TRIGGERS_KEY, trigger_field(self.stream, self.group), json.dumps(info))

    async def _net_retry(self, what: str, fn: Any) -> tuple[bool, Any]:
        return await net_retry(self.stream, self._stopping, what, fn)

    # --- reading --------------------------------------------------------------------------------

    async def _wait_capacity(self) -> None:
        while self._inflight >= self.trigger.max_inflight and not self._stopping.is_set():
            self._free.clear()
            await self._free.wait()

    async def _read_loop(self) -> None:
        assert self._rd is not None
        delay, need_setup, first = 0.05, True, True
        while not self._stopping.is_set():
            try:
                if need_setup:
                    await self._setup()
                    need_setup = False
                    await self._recover_own()
                    if first:
                        first = False
                        self.ready.set()
                await self._wait_capacity()
                if self._stopping.is_set():
                    break
                n = min(self.trigger.batch_size, self.trigger.max_inflight - self._inflight)
                resp = await self._rd.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=n, block=self.block_ms
                )
                delay = 0.05
                for _stream, entries in resp or ():
                    if self._batched and len(entries) > 1:
                        self._dispatch_batch([(sid(eid), fields) for eid, fields in entries])
                    else:
                        for eid, fields in entries:
                            self._dispatch(sid(eid), fields, 1)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    log.warning(
                        "%s: consumer group %s vanished; recreating", self.stream, self.group
                    )
                    need_setup = True
                else:
                    log.error("%s: XREADGROUP failed: %s", self.stream, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            except NET_ERRORS as e:
                self.stats.reconnects += 1
                log.warning(
                    "%s: Redis connection lost (%s); reconnecting in %.2fs", self.stream, e, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                need_setup = True

    async def _recover_own(self) -> None:
        """Re-deliver entries this consumer name holds but this process does not know about (a
        previous run of the same consumer, or a read whose reply was lost on a dropped link)."""
        start = "-"
        while not self._stopping.is_set():
            start, rows = await self._pel.mine(start)
            if not rows:
                return
            for eid, times_delivered in rows:
                if eid in self._held:
                    continue
                await self._wait_capacity()
                fields = await self._pel.claim(eid)
                if fields is not None:
                    self.stats.reclaimed += 1
                    self._dispatch(eid, fields, times_delivered + 1)

    async def _reclaim_loop(self) -> None:
        """XAUTOCLAIM entries idle longer than claim_idle_s (their consumer died or hung)."""
        assert self._r is not None
        await self._sleep_or_stop(0)
        period = max(0.05, min(self.trigger.claim_idle_s / 2, 5.0))
        min_idle_ms = int(self.trigger.claim_idle_s * 1000)
        while not self._stopping.is_set():
            try:
                if not self.ready.is_set():
                    await self._sleep_or_stop(0.05)
                    continue
                await self._wait_capacity()
                if self._stopping.is_set():
                    break
                n = max(1, min(self.trigger.batch_size, self.trigger.max_inflight - self._inflight))
                taken = await self._pel.take_idle(min_idle_ms, n, self._held)
                for eid, f, times_delivered in taken:
                    self.stats.reclaimed += 1
                    log.info("%s: reclaimed %s (delivery %s)", self.stream, eid, times_delivered)
                    self._dispatch(eid, f, times_delivered)
                if self._pel.cursor == "0-0":
                    await self._sleep_or_stop(period)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    log.error("%s: XAUTOCLAIM failed: %s", self.stream, e)
                await self._sleep_or_stop(period)
            except NET_ERRORS:
                await self._sleep_or_stop(period)

    async def _heartbeat_loop(self) -> None:
        """Keep the idle time of held entries (slow invocations, backoffs) below claim_idle_s so
        other consumers do not take them over while this one is alive (XCLAIM JUSTID: no count)."""
        assert self._r is not None
        period = max(0.05, self.trigger.claim_idle_s / 3)
        while not self._stopping.is_set():
            await self._sleep_or_stop(period)
            now = time.monotonic()
            ids = [eid for eid, h in self._held.items() if now - h.since >= period]
            await self._pel.touch(ids)
            for eid in ids:
                if eid in self._held:
                    self._held[eid].since = now

    async def _sleep_or_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # --- processing -----------------------------------------------------------------------------

    def _dispatch(self, eid: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        self._held[eid] = _Held(fields, deliveries)
        self._inflight += 1
        self.stats.delivered += 1
        t = asyncio.create_task(self._process(eid, fields, deliveries))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _forget(self, eid: str) -> None:
        self._held.pop(eid, None)
        self._undelivered.pop(eid, None)

    def _release(self, n: int = 1) -> None:
        self._inflight -= n
        self._free.set()

    def _dispatch_batch(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """First deliveries read together: one task, one `invoke_batch` (retries go one by one)."""
        for eid, fields in entries:
            self._held[eid] = _Held(fields, 1)
        self._inflight += len(entries)
        self.stats.delivered += len(entries)
        t = asyncio.create_task(self._process_batch(entries))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _process(self, eid: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        try:
            await self._process_one(eid, fields, deliveries)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. the group was deleted under us; the entry stays pending
            log.error("%s: processing %s failed: %s: %s", self.stream, eid, type(e).__name__, e)
            self._forget(eid)
        finally:
            self._release()

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
                    self._forget(eid)
        finally:
            self._release(len(entries))

    async def _prepare(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int
    ) -> tuple[Decoded, dict[str, str]] | None:
        """Decode an entry and its invocation headers; None when it went to the DLQ instead."""
        try:
            dec = decode_entry(fields)
        except MalformedEntry as e:
            self.stats.malformed += 1
            await self._settler.dead_letter(eid, fields, str(e), deliveries, "malformed", None)
            return None
        if deliveries > self.trigger.max_deliveries:
            msg = (
                f"delivery {deliveries} exceeds max_deliveries {self.trigger.max_deliveries}: "
                "the consumers that received it stopped before finishing (crash or hang)"
            )
            await self._settler.dead_letter(eid, fields, msg, deliveries, "exhausted", dec)
            return None
        if dec.reply and dec.invocation_id:
            await self._settler.mark_running(dec, deliveries)
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
                await self._settler.finish_async(dec, deliveries, outcome)
            self._settler.ack(eid)
            return
        self.stats.failed += 1
        if count_it and deliveries >= self.trigger.max_deliveries:
            await self._settler.dead_letter(eid, fields, err, deliveries, "failed", dec)
            return
        log.info(
            "%s: %s delivery %d failed (%s); retrying", self.stream, eid, deliveries, err[:200]
        )
        if not count_it:
            self._undelivered[eid] = self._undelivered.get(eid, 0) + 1
        self._schedule_retry(eid, fields, deliveries, count_it)

    def _schedule_retry(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int, count_it: bool
    ) -> None:
        t = asyncio.create_task(self._retry(eid, fields, deliveries, count_it))
        self._waiting.add(t)
        t.add_done_callback(self._waiting.discard)

    async def _retry(
        self, eid: str, fields: dict[bytes, bytes], deliveries: int, count_it: bool
    ) -> None:
        assert self._r is not None
        self.stats.retried += 1
        attempts = deliveries + self._undelivered.get(eid, 0)  # keeps growing in an outage
        await asyncio.sleep(
            backoff_delay(attempts, self.trigger.backoff_s, self.trigger.backoff_max_s)
        )
        await self._wait_capacity()
        if self._stopping.is_set():
            self._forget(eid)
            return

        try:
            ok, value = await self._net_retry(
                "retry claim", lambda _a: self._pel.take_back(eid, count_it)
            )
        except ResponseError as e:  # NOGROUP: the stream or group was deleted meanwhile
            log.warning("%s: cannot re-claim %s for a retry: %s", self.stream, eid, e)
            ok, value = False, None
        got, row = value if ok else ([], None)
        if not got:
            self._forget(eid)
            return
        n = int(row["times_delivered"]) + (1 if count_it else 0)
        f = got[0][1] if count_it else fields
        if f is None:  # deleted from the stream (XDEL) while pending: nothing to deliver
            self._forget(eid)
            self._settler.ack(eid)
            return
        self._dispatch(eid, f, n)
