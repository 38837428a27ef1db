"""A peer whose registration lapses while its link still answers keeps its link, and the calls
in flight on it are answered. The heartbeat closed such a link at once, and every call on it
failed with 503 "went away during the call (closed by us)": 63 calls in a clean-clone run on a
loaded machine, 7 Dec 2026, where a node's heartbeat was late but the node was serving. A link
that fails on its own, or a peer that comes back with another boot, still ends the link.

Two real members in this process: real Redis, real link servers and sockets on loopback; the
serving side's agent is a stand-in whose one function answers when the test lets it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
from call_outcomes import until
from hearth.cluster.member import Member, MemberConfig, stale_link
from hearth.cluster.peers import Peer, PeerRegistry
from hearth.dataplane.shm import SlotPool
from hearth.invoke import InvokeResult

TOKEN = b"lapse-test-token-0123456789abcdef"


def cfg(node: str) -> MemberConfig:
    return MemberConfig(
        node=node, token=TOKEN, http_url=f"http://{node}", heartbeat_s=0.1, peer_ttl_s=0.6
    )


@pytest.fixture
def pool():
    p = SlotPool.create(f"hearth-test-lapse-{os.urandom(4).hex()}", [(64 << 10, 8)])
    yield p
    p.destroy()


class SlowAgent:
    """Serves `slow` when `release` is set; everything the member reads of an agent. A call's
    payload lands in `pool` (a real shared-memory slot pool)."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def invoke(self, function: str, payload, **kw) -> InvokeResult:
        try:
            body = bytes(payload.slot.buf[payload.offset : payload.offset + payload.length])
        finally:
            self.pool.release(payload.slot.index, payload.slot.gen)
        self.entered.set()
        await self.release.wait()
        return InvokeResult(200, b"served:" + body, "text/plain")

    def start_call(self, *a, **kw) -> bool:
        return False  # always the task path (`invoke`)

    def deployed(self) -> list:
        return []

    def ready_counts(self) -> dict[str, int]:
        return {}


IDLE = SimpleNamespace(pool=None, deployed=lambda: [], ready_counts=lambda: {})


@contextlib.asynccontextmanager
async def members(redis_url: str, agent_c) -> AsyncIterator[tuple[Member, Member]]:
    """node-c (serving with `agent_c`), then node-a, started on real Redis; node-a has seen
    node-c. Both closed after, and their Redis client."""
    r = aioredis.Redis.from_url(redis_url)
    c = await Member(agent_c, r, cfg("node-c")).start()
    a = await Member(IDLE, r, cfg("node-a")).start()
    try:
        await until(lambda: "node-c" in a.peers, "node-a to see node-c")
        yield a, c
    finally:
        await a.close()
        await c.close()
        await r.aclose()


async def test_a_lapsed_registration_keeps_a_live_link_and_its_calls(redis_url, pool):
    slow = SlowAgent(pool)
    async with members(redis_url, slow) as (a, c):
        try:
            link = await a.link("node-c")
            call = asyncio.ensure_future(
                link.call("slow", {"content_type": "text/plain"}, b"x", timeout=30)
            )
            await asyncio.wait_for(slow.entered.wait(), 10)
            # node-c's heartbeat stops (as when late under load); its link server serves on
            c._closing = True
            assert c._task is not None
            c._task.cancel()
            await asyncio.gather(c._task, return_exceptions=True)
            await until(lambda: "node-c" not in a.peers, "node-c's registration to lapse at node-a")
            await asyncio.sleep(3 * a.cfg.heartbeat_s)  # three more heartbeats of node-a
            assert "node-c" not in a.peers
            assert link.alive and link.closed is None, link.closed
            assert a.links.get("node-c") is link
            slow.release.set()
            reply = await asyncio.wait_for(call, 10)
            assert reply.meta["status"] == 200 and bytes(reply.body) == b"served:x"

            # node-c announces again with another boot (it restarted): the old link is ended
            other = Peer(node="node-c", link=c.link_address, http="http://node-c", boot="another")
            await PeerRegistry(a.r, 5.0).announce(other)
            await until(lambda: "node-c" not in a.links, "the link to the old boot to be closed")
            await until(lambda: not link.alive, "the old link to close")
            assert link.closed == "closed by us"
        finally:
            slow.release.set()  # (a failed run: the served call ends before the members close)


async def test_a_link_that_failed_on_its_own_is_dropped(redis_url):
    async with members(redis_url, IDLE) as (a, c):
        link = await a.link("node-c")
        await c.server.close()  # the peer's link server goes away; its registration lives on
        await until(lambda: not link.alive, "the link to fail")
        await until(lambda: "node-c" not in a.links, "node-a's heartbeat to drop the dead link")
        assert "node-c" in a.peers  # dropped for its own failure, not for the registry


def test_the_rule():
    p = Peer(node="n", link="h:1", http="http://n", boot="b1")
    assert stale_link(False, "b1", p)  # failed on its own
    assert not stale_link(True, "b1", None)  # registration lapsed, link answers: kept
    assert not stale_link(True, "b1", p)  # the same boot
    assert stale_link(True, "b0", p)  # another boot: the peer restarted
    assert not stale_link(True, "", p)  # a boot not known when dialed: nothing to compare
