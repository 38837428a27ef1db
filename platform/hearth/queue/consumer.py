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

This module reads and claims entries and keeps the held ones from being taken over;
`delivery.Deliveries` runs each and decides what happens to it, `wire.failure` (pure) says how an
outcome counts, and `settle.Settler` writes the end of each delivery to Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hearth.invoke import Invoker
from hearth.queue.delivery import Deliveries
from hearth.queue.keys import TRIGGERS_KEY, trigger_field
from hearth.queue.pending import PendingEntries, sid
from hearth.queue.redis_retry import NET_ERRORS
from hearth.queue.settle import RunnerStats, Settler
from hearth.queue.wire import default_group, dlq_name
from hearth.spec import StreamTrigger

log = logging.getLogger("hearth.queue")


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
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._settler = Settler(
            self.function,
            self.stream,
            self.group,
            self.dlq,
            self.stats,
            self._stopping,
            lambda eid: self._d.forget(eid),
            lambda: self._stopping.is_set() and not self._d.tasks,
            # a stream only this runner reads (async invocations): acked entries are deleted, so
            # it holds only what waits or runs (their results live in their own expiring hashes)
            delete_acked=delete_acked,
            callback_attempts=callback_attempts,
            callback_backoff_s=callback_backoff_s,
        )
        self._pel = PendingEntries(self.stream, self.group, self.consumer)
        # the entries read and held: their invocations, retries and settling
        self._d = Deliveries(
            self.function,
            self.stream,
            trigger,
            invoker,
            invoke_timeout,
            self.stats,
            self._pel,
            self._settler,
            self._stopping,
        )
        self.ready = asyncio.Event()  # set once the group exists and reading started

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
        self._d.free.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for t in list(self._d.waiting):
            t.cancel()
        await asyncio.gather(*self._d.waiting, return_exceptions=True)
        if self._d.tasks:
            done, pending = await asyncio.wait(list(self._d.tasks), timeout=timeout)
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
        return self._d.inflight

    @property
    def held(self) -> int:
        return len(self._d.held)

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

    # --- reading --------------------------------------------------------------------------------

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
                await self._d.wait_capacity()
                if self._stopping.is_set():
                    break
                n = min(self.trigger.batch_size, self.trigger.max_inflight - self._d.inflight)
                resp = await self._rd.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=n, block=self.block_ms
                )
                delay = 0.05
                for _stream, entries in resp or ():
                    if self._d.batched and len(entries) > 1:
                        self._d.dispatch_batch([(sid(eid), fields) for eid, fields in entries])
                    else:
                        for eid, fields in entries:
                            self._d.dispatch(sid(eid), fields, 1)
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
                if eid in self._d.held:
                    continue
                await self._d.wait_capacity()
                fields = await self._pel.claim(eid)
                if fields is not None:
                    self.stats.reclaimed += 1
                    self._d.dispatch(eid, fields, times_delivered + 1)

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
                await self._d.wait_capacity()
                if self._stopping.is_set():
                    break
                n = max(
                    1, min(self.trigger.batch_size, self.trigger.max_inflight - self._d.inflight)
                )
                taken = await self._pel.take_idle(min_idle_ms, n, self._d.held)
                for eid, f, times_delivered in taken:
                    self.stats.reclaimed += 1
                    log.info("%s: reclaimed %s (delivery %s)", self.stream, eid, times_delivered)
                    self._d.dispatch(eid, f, times_delivered)
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
            ids = [eid for eid, h in self._d.held.items() if now - h.since >= period]
            await self._pel.touch(ids)
            for eid in ids:
                if eid in self._d.held:
                    self._d.held[eid].since = now

    async def _sleep_or_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
