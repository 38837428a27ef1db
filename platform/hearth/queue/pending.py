"""One consumer's commands on its group's pending-entries list (PEL) in Redis: the entries it
holds after a restart, idle entries of consumers that stopped (XAUTOCLAIM), keeping its own
entries from looking idle (XCLAIM JUSTID), and taking an entry back for a retry.

Only the Redis exchanges live here; when to run them, and what to do with the entries they
return, is the runner's (`consumer.StreamTriggerRunner`)."""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hearth.queue.redis_retry import NET_ERRORS

log = logging.getLogger("hearth.queue")

Entry = tuple[str, dict[bytes, bytes], int]  # (entry id, fields, times delivered)


def sid(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class PendingEntries:
    def __init__(self, stream: str, group: str, consumer: str):
        self.stream, self.group, self.consumer = stream, group, consumer
        self.r: aioredis.Redis | None = None  # set by the runner when it connects
        self.cursor = "0-0"  # where the next XAUTOCLAIM scan goes on ("0-0": a round is done)

    async def mine(self, after: str, count: int = 100) -> tuple[str, list[tuple[str, int]]]:
        """Entries this consumer holds from `after` on ("-" first), as (id, times delivered),
        and where the next page starts."""
        assert self.r is not None
        rows = await self.r.xpending_range(
            self.stream, self.group, min=after, max="+", count=count, consumername=self.consumer
        )
        if not rows:
            return after, []
        nxt = "(" + sid(rows[-1]["message_id"])
        return nxt, [(sid(row["message_id"]), int(row["times_delivered"])) for row in rows]

    async def claim(self, eid: str) -> dict[bytes, bytes] | None:
        """Take `eid` now (XCLAIM, which counts a delivery); its fields, or None if it is gone."""
        assert self.r is not None
        claimed = await self.r.xclaim(self.stream, self.group, self.consumer, 0, [eid])
        return claimed[0][1] if claimed and claimed[0][1] is not None else None

    async def take_idle(self, min_idle_ms: int, count: int, held: Container[str]) -> list[Entry]:
        """XAUTOCLAIM entries idle for `min_idle_ms` (their consumer died or hung) from `self.cursor`
        on, skipping those in `held`; entries deleted from the stream meanwhile are acked.
        Returns the entries that are now this consumer's."""
        assert self.r is not None
        nxt, entries, *_deleted = await self.r.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_ms, self.cursor, count=count
        )
        self.cursor = sid(nxt)
        fresh = [(sid(eid), f) for eid, f in entries if sid(eid) not in held]
        gone = [eid for eid, f in fresh if f is None]
        if gone:
            await self.r.xack(self.stream, self.group, *gone)
        fresh = [(eid, f) for eid, f in fresh if f is not None]
        taken: list[Entry] = []
        if fresh:
            async with self.r.pipeline(transaction=False) as p:
                for eid, _ in fresh:
                    p.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
                counts = await p.execute()
            for (eid, f), rows in zip(fresh, counts, strict=True):
                if rows and sid(rows[0]["consumer"]) == self.consumer:
                    taken.append((eid, f, int(rows[0]["times_delivered"])))
        return taken

    async def touch(self, ids: list[str]) -> None:
        """Reset the idle time of `ids` (XCLAIM JUSTID: no delivery counted) so that other
        consumers do not take them over; a failure is left to the next round."""
        assert self.r is not None
        for i in range(0, len(ids), 500):
            try:
                await self.r.xclaim(
                    self.stream, self.group, self.consumer, 0, ids[i : i + 500], justid=True
                )
            except (ResponseError, *NET_ERRORS) as e:
                log.debug("%s: heartbeat failed: %s", self.stream, e)
                break

    async def take_back(self, eid: str, count_it: bool) -> tuple[list[Any], Any]:
        """Claim `eid` again for a retry if this consumer still holds it: (XCLAIM's answer, its
        PEL row), or ([], None) when it was acked or taken over by another consumer meanwhile.
        Only a counted retry (`count_it`) bumps the delivery count (and gets the fields)."""
        assert self.r is not None
        rows = await self.r.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
        if not rows or sid(rows[0]["consumer"]) != self.consumer:
            return [], None
        got = await self.r.xclaim(
            self.stream, self.group, self.consumer, 0, [eid], justid=not count_it
        )
        return got, rows[0]
