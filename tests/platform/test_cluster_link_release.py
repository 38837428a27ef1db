"""A call on the agent-to-agent link has its deadline on the link's one heap of deadlines
(`cluster.link`, `agent.deadlines.Deadlines`), which keeps an ended call's entry until its
deadline (the call's timeout, often 30 s or more) is due or the heap is compacted. That entry
must hold nothing of the call once it has ended, however it ended (answered, refused by the
peer, the link lost) and however it was made (`LinkClient.call`, or `LinkClient.start` with a
callback): not the reply, not its body, not the caller's sink or callback and what they keep.
On a real link over loopback (LinkServer, LinkClient) with the payload landing in a real pool."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from call_outcomes import until
from hearth.cluster.landing import SlotLanding
from hearth.cluster.link import LinkClient, NodeUnavailable, Reply
from hearth.cluster.serve import LinkServer
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeError, Overloaded

TOKEN = b"link-release-token-0123456789"
TIMEOUT = 600.0  # every call's: its deadline stays far ahead for the whole test
BODY = b"answer" * 100


@pytest.fixture
def pool():
    p = SlotPool.create(f"hearth-test-lr-{os.urandom(4).hex()}", [(64 << 10, 16)])
    yield p
    p.destroy()


class Peer:
    """Node b: answers "ok", refuses "full" (429), keeps "stall" until it goes away."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool, self.seen = pool, 0
        self.server = LinkServer("node-b", TOKEN, self.handle, SlotLanding(pool))

    async def handle(self, fn: str, meta: dict, payload: Any, timeout: float, reply=None):
        self.pool.release(payload.slot.index, payload.slot.gen)
        self.seen += 1
        if fn == "full":
            raise Overloaded(fn)
        if fn == "stall":
            await asyncio.Event().wait()  # until the server's close cancels it
        return {"status": 200}, BODY


class Body(bytearray):
    """A reply body in the caller's own buffer (a reply slot stands here: weakly referable)."""


class Books:
    """What a caller keeps about its call: where its reply body goes (`sink`), where its answer
    goes (`done`, for `LinkClient.start`)."""

    def __init__(self) -> None:
        self.answers: list[Reply | InvokeError] = []

    def sink(self, n: int, meta: dict) -> tuple[memoryview, Body]:
        body = Body(n)
        return memoryview(body), body

    def done(self, outcome: Reply | InvokeError) -> None:
        self.answers.append(outcome)


@contextlib.asynccontextmanager
async def linked(pool: SlotPool) -> AsyncIterator[tuple[Peer, LinkClient]]:
    peer = Peer(pool)
    await peer.server.start()
    c = await LinkClient("node-a", "node-b", peer.server.address, TOKEN).connect()
    try:
        yield peer, c
    finally:
        await c.close()
        await peer.server.close()
    assert pool.stats()["used"] == 0


async def by_call(c: LinkClient, fn: str, books: Books) -> Reply | InvokeError:
    try:
        return await c.call(fn, {}, b"x", timeout=TIMEOUT, sink=books.sink)
    except InvokeError as e:
        return e


async def ended(how: str, fn: str, peer: Peer, c: LinkClient, books: Books) -> Any:
    """Call `fn` through `how`; "stall" ends with the peer going away."""
    if how == "call":
        t = asyncio.create_task(by_call(c, fn, books))
    else:
        assert c.start(fn, {}, b"x", timeout=TIMEOUT, done=books.done)
    if fn == "stall":
        await until(lambda: peer.seen, "the call at the peer")
        await peer.server.close()  # the link is lost with the call in flight
    if how == "call":
        return await t
    await until(lambda: books.answers, "the callback")
    return books.answers[0]


def due_in(c: LinkClient) -> list[float]:
    """Seconds until each entry on the link's deadline heap is due."""
    d = c._deadlines
    assert d is not None
    return [e[0] - d.loop.time() for e in d._heap]


@pytest.mark.parametrize("how", ["call", "start"])
@pytest.mark.parametrize("fn, status", [("ok", 200), ("full", 429), ("stall", 503)])
async def test_an_ended_call_leaves_nothing_of_it_on_the_deadline_heap(pool, how, fn, status):
    async with linked(pool) as (peer, c):
        books = Books()
        got = await ended(how, fn, peer, c, books)
        if status == 200:
            assert isinstance(got, Reply) and got.meta["status"] == 200 and got.body == BODY
            # the call's reply body went to the caller's sink (`start`: bytes)
            assert isinstance(got.body, Body if how == "call" else bytes)
        else:
            assert isinstance(got, InvokeError) and got.status == status, got
            assert not isinstance(got, NodeUnavailable) or "node-b" in str(got)
        refs = [weakref.ref(books), weakref.ref(got)]
        if isinstance(got.body if status == 200 else None, Body):
            refs.append(weakref.ref(got.body))
        del books, got
        await asyncio.sleep(0.01)  # (loop passes: the handles that woke the caller are run)
        # the call's entry is still on the heap, its deadline far ahead...
        assert len(due_in(c)) == 1 and min(due_in(c)) > TIMEOUT - 60, due_in(c)
        gc.collect()
        # ...and nothing of the call is reachable from it (before: an answered call's future
        # held its reply and body, a failed one's its error, whose traceback held the caller's
        # frames and sink; a started call held its callback and the caller's books)
        held = [r() for r in refs if r() is not None]
        assert not held, [
            (type(o).__name__, [type(x).__name__ for x in gc.get_referrers(o)]) for o in held
        ]
