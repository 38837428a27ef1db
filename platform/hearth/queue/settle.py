"""How a stream entry's delivery ends, in Redis: acked after success (batched: while one XACK
round trip is in flight, completions accumulate), dead-lettered (the DLQ entry and the XACK in
one MULTI/EXEC), and for an async invocation its result stored and its callback sent.

The runner (`consumer.StreamTriggerRunner`) decides what happens to an entry; a `Settler` carries
it out and counts it in the runner's `RunnerStats`. Writes are retried across lost connections
(`redis_retry.net_retry`), so nothing is lost when Redis blips."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import redis.asyncio as aioredis

from hearth.queue import async_invoke
from hearth.queue.keys import ACKED_KEY, RATE_WINDOW_S, rate_key, trigger_field
from hearth.queue.redis_retry import net_retry
from hearth.queue.wire import Decoded

log = logging.getLogger("hearth.queue")


@dataclass
class RunnerStats:
    delivered: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    malformed: int = 0
    reclaimed: int = 0
    reconnects: int = 0
    acked: int = 0


class AsyncOutcome(NamedTuple):
    """How an async invocation ended, named as `queue_store_result` and `send_callback` take it,
    so the stored result and the callback are built from one value."""

    status: str  # succeeded | failed
    http_status: int | None
    body: bytes
    content_type: str | None
    error: str | None

    @classmethod
    def failed(cls, error: str) -> AsyncOutcome:
        """Dead-lettered: no response from the function, only the error."""
        return cls("failed", None, b"", None, error)


class Settler:
    """Carries out the end of each delivery for one runner (one stream, group and function).
    `forget(eid)` is called once an entry is settled in Redis; `idle()` tells the ack loop that
    no invocation can produce another ack (the runner is stopping and has no task left)."""

    def __init__(
        self,
        function: str,
        stream: str,
        group: str,
        dlq: str,
        stats: RunnerStats,
        stopping: asyncio.Event,
        forget: Callable[[str], None],
        idle: Callable[[], bool],
        *,
        delete_acked: bool,
        callback_attempts: int,
        callback_backoff_s: float,
    ):
        self.function, self.stream, self.group, self.dlq = function, stream, group, dlq
        self.stats = stats
        self._stopping = stopping
        self._forget = forget
        self._idle = idle
        self.delete_acked = delete_acked
        self.callback_attempts = callback_attempts
        self.callback_backoff_s = callback_backoff_s
        self.r: aioredis.Redis | None = None  # set by the runner when it connects
        self._ack_buf: list[str] = []
        self._ack_wake = asyncio.Event()
        self._acker: asyncio.Task | None = None
        self._side: set[asyncio.Task] = set()  # callbacks
        self._session: Any = None

    def start(self, r: aioredis.Redis) -> None:
        self.r = r
        self._acker = asyncio.create_task(self._ack_loop(), name=f"ack:{self.stream}")

    async def stop(self, timeout: float | None) -> None:
        """Let callbacks finish, flush the acks, close the callback session."""
        if self._side:
            await asyncio.wait(list(self._side), timeout=timeout)
        self._ack_wake.set()
        if self._acker:
            try:
                await asyncio.wait_for(self._acker, timeout=timeout)
            except TimeoutError:
                log.warning(
                    "%s: %d acks not flushed (Redis unreachable); entries will be redelivered",
                    self.stream,
                    len(self._ack_buf),
                )
        if self._session is not None:
            await self._session.close()

    async def _net_retry(self, what: str, fn: Any) -> tuple[bool, Any]:
        return await net_retry(self.stream, self._stopping, what, fn)

    # --- acks -----------------------------------------------------------------------------------

    def ack(self, eid: str) -> None:
        self._ack_buf.append(eid)
        self._ack_wake.set()

    async def _ack_loop(self) -> None:
        """Acks are batched: while one XACK round trip is in flight, completions accumulate."""
        assert self.r is not None
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            if not self._ack_buf:
                if self._idle():
                    return
                continue
            ids, self._ack_buf = self._ack_buf, []
            sec = int(time.time())

            async def flush(_attempt: int, ids: list[str] = ids, sec: int = sec) -> bool:
                async with self.r.pipeline(transaction=False) as p:
                    p.xack(self.stream, self.group, *ids)
                    if self.delete_acked:
                        p.xdel(self.stream, *ids)
                    p.hincrby(ACKED_KEY, trigger_field(self.stream, self.group), len(ids))
                    p.incrby(rate_key(self.stream, self.group, sec), len(ids))
                    p.expire(rate_key(self.stream, self.group, sec), RATE_WINDOW_S * 6)
                    res = await p.execute(raise_on_error=False)
                if isinstance(res[0], Exception):  # e.g. NOGROUP: stream/group deleted meanwhile
                    log.warning("%s: XACK of %d entries failed: %s", self.stream, len(ids), res[0])
                    return False
                return True

            ok, acked = await self._net_retry("ack", flush)
            if not ok:
                self._ack_buf = ids + self._ack_buf
                return
            if acked:
                self.stats.acked += len(ids)
            for eid in ids:
                self._forget(eid)
            self._ack_wake.set()  # re-check (stop condition / more acks)

    # --- async invocations ----------------------------------------------------------------------

    async def mark_running(self, dec: Decoded, deliveries: int) -> None:
        async def mark(_attempt: int) -> None:
            async with self.r.pipeline(transaction=False) as p:
                async_invoke.queue_mark_running(p, dec.invocation_id, dec.reply, deliveries)
                await p.execute()

        await self._net_retry("mark running", mark)

    async def finish_async(self, dec: Decoded, deliveries: int, outcome: AsyncOutcome) -> None:
        async def store(_attempt: int) -> None:
            async with self.r.pipeline(transaction=False) as p:
                async_invoke.queue_store_result(
                    p, dec.invocation_id, dec.reply, **outcome._asdict(), attempt=deliveries
                )
                await p.execute()

        await self._net_retry("store result", store)
        self._callback(dec, outcome)

    def _callback(self, dec: Decoded, outcome: AsyncOutcome) -> None:
        if not (dec.reply and dec.reply.get("callback")):
            return
        if self._session is None:
            from hearth.queue.callbacks import session

            self._session = session()
        t = asyncio.create_task(
            async_invoke.send_callback(
                self._session,
                self.r,
                dec.invocation_id,
                dec.reply,
                self.function,
                **outcome._asdict(),
                attempts=self.callback_attempts,
                backoff_s=self.callback_backoff_s,
            )
        )
        self._side.add(t)
        t.add_done_callback(self._side.discard)

    # --- dead letters ---------------------------------------------------------------------------

    async def dead_letter(
        self,
        eid: str,
        fields: dict[bytes, bytes],
        error: str,
        deliveries: int,
        kind: str,
        dec: Decoded | None,
    ) -> None:
        """XADD to the DLQ and XACK the original atomically (MULTI/EXEC): never both or neither lost."""
        assert self.r is not None
        entry = {
            b"error": error.encode(),
            b"kind": kind.encode(),
            b"deliveries": str(deliveries).encode(),
            b"function": self.function.encode(),
            b"source_stream": self.stream.encode(),
            b"source_group": self.group.encode(),
            b"source_id": eid.encode(),
            b"failed_at": repr(time.time()).encode(),
            b"fields": msgpack.packb(dict(fields), use_bin_type=True),
        }
        failed = AsyncOutcome.failed(error)

        async def write(attempt: int) -> None:
            if attempt:  # the previous EXEC may have committed before the link dropped
                rows = await self.r.xpending_range(
                    self.stream, self.group, min=eid, max=eid, count=1
                )
                if not rows:
                    return
            async with self.r.pipeline(transaction=True) as p:
                p.xadd(self.dlq, entry)
                p.xack(self.stream, self.group, eid)
                if dec is not None and dec.reply and dec.invocation_id:
                    async_invoke.queue_store_result(
                        p, dec.invocation_id, dec.reply, **failed._asdict(), attempt=deliveries
                    )
                await p.execute()

        await self._net_retry("dead-letter", write)
        self._forget(eid)
        self.stats.dead_lettered += 1
        log.warning(
            "%s: %s dead-lettered to %s after %d deliveries: %s",
            self.stream,
            eid,
            self.dlq,
            deliveries,
            error[:300],
        )
        if dec is not None and dec.reply and dec.invocation_id:
            self._callback(dec, failed)
