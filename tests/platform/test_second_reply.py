"""A faulty instance's second reply to a call already answered in its request slot: the slot
it names, one of its own handed to the agent, is freed exactly once, and a stray reply never
frees a slot another instance handed over. A real agent and a real instance process."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio
from hearth.config import Settings
from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.segment import ROW_U32, ROW_U64
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def platform(redis_server):
    s = Settings.from_env(port=free_port(), redis_url=redis_server.url, dataplane_mode="auto")
    s.state = Path(tempfile.mkdtemp(prefix="hearth-sr-"))
    s.admin_token = "test-token-123456"
    async with Platform(s, warm_pool_size=0) as p:
        yield p


async def _until(cond, what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_second_reply_after_an_answer_in_the_request_slot_frees_its_slot_once(
    platform, tmp_path
):
    agent = platform.agent
    spec = {
        "name": "sr-faulty",
        "handler": "faulty_handlers:second_reply",
        "code_path": str(Path(__file__).parent),
    }
    await agent.deploy(parse_spec(spec))
    out = tmp_path / "second-slot"
    res = await agent.invoke("sr-faulty", str(out).encode(), content_type="text/plain")
    assert res.status == 200 and bytes(res.body) == b"first"  # the first answer, untouched
    await _until(out.exists, "the instance's second reply")
    i, g = (int(v) for v in out.read_text().split())
    pool = agent.pool
    # leaked before: the agent's, handed over by the instance, never read nor freed
    await _until(lambda: pool.owner(i, g) is None, "the second reply's slot to be freed", 10)
    assert pool._u32[i * ROW_U32 + 2] == (g + 1) & 0xFFFFFFFF  # freed once: one generation on
    # the same stray naming a slot another process handed over frees nothing
    (inst,) = agent.functions["sr-faulty"].instances.values()
    other = pool.alloc(10)
    pool.give_to_creator(other.index, other.gen)  # handed over by this process, not the instance
    stray = Descriptor(
        dst=0, src=inst.eid, kind=Kind.REPLY, slot=other.index, gen=other.gen, corr=os.urandom(16)
    )
    agent.link.dispatch(stray)
    assert pool.owner(other.index, other.gen) == (pool.creator_pid, pool.creator_start)
    # ... and naming one the instance handed over, once: freed; a repeat is stale, nothing more
    pool._u32[other.index * ROW_U32 + 5] = inst.ident[0]
    pool._u64[other.index * ROW_U64 + 4] = inst.ident[1]
    agent.link.dispatch(stray)
    assert pool.owner(other.index, other.gen) is None
    agent.link.dispatch(stray)
    assert pool._u32[other.index * ROW_U32 + 2] == (other.gen + 1) & 0xFFFFFFFF


async def test_a_stray_reply_read_after_its_instances_exit_still_frees_what_it_handed_over(
    platform,
):
    """The instance's exit may be handled before its last descriptors are read: its endpoint
    still names its process for a while, so a slot it handed over is freed then too."""
    agent = platform.agent
    await agent.deploy(
        parse_spec({"name": "sr-exits", "handler": "hearth.functions.examples.handlers:echo"})
    )
    assert (await agent.invoke("sr-exits", b"x", content_type="text/plain")).status == 200
    (inst,) = agent.functions["sr-exits"].instances.values()
    ident, pool = inst.ident, agent.pool
    inst.kill()
    await _until(lambda: inst.eid not in agent.table.by_eid, "its exit to be handled")
    s = pool.alloc(10)
    pool.give_to_creator(s.index, s.gen)
    pool._u32[s.index * ROW_U32 + 5], pool._u64[s.index * ROW_U64 + 4] = ident  # (as its own)
    agent.link.dispatch(
        Descriptor(dst=0, src=inst.eid, kind=Kind.REPLY, slot=s.index, gen=s.gen, corr=b"k" * 16)
    )
    assert pool.owner(s.index, s.gen) is None
