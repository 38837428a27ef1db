"""A zygote that misses its start timeout is stopped (hearth.agent.zygote_server.Zygote.abort),
and starts wait for a built-ins' zygote that keeps working only until the cap after its start:
real zygote processes whose preload spins, a start timeout patched down to seconds."""

from __future__ import annotations

import asyncio

import hearth.agent.zygote_server as zygote_server
from hearth.agent.instance import POOL_RUNTIME, ForkedInstance
from hearth.agent.zygote import BUILTINS_KEY
from zygote_procs import booting_pid, kill_all, zygote_gone, zygote_runner, zygotes_of_mine

# imported by the zygote first (the node's HEARTH_ZYGOTE_PRELOAD): works (CPU) for a minute, so
# the zygote never reports ready within the patched start timeout
SPIN = """
import time

t0 = time.monotonic()
while time.monotonic() - t0 < 60:
    pass
"""


async def test_a_zygote_that_misses_its_start_timeout_is_stopped(tmp_path, monkeypatch):
    """Before: the timed-out zygote kept spinning with its control socket open, its state read
    gone, and each later trigger (a cold start here) started one more beside it."""
    monkeypatch.setattr(zygote_server, "START_TIMEOUT_S", 2.0)
    # each cold start tries a new zygote (retry_s=0)
    runner = zygote_runner(tmp_path, monkeypatch, "zabort", SPIN, retry_s=0.0)
    pids: list[int] = []
    try:
        for _ in range(2):  # two cold starts, each finding no zygote ready
            got = asyncio.create_task(runner.zygote(POOL_RUNTIME))
            pids.append(await booting_pid(runner, POOL_RUNTIME))
            assert zygotes_of_mine() == {pids[-1]}  # only the one starting now
            assert await got is None  # timed out: the start goes on as a plain process
            assert runner.status()[POOL_RUNTIME]["state"] == "gone"
            assert await zygote_gone(pids[-1]), f"zygote {pids[-1]} still runs after its timeout"
        assert pids[0] != pids[1] and zygotes_of_mine() == set()
    finally:
        kill_all(zygotes_of_mine())
        await runner.close()


async def test_the_cap_on_waits_for_a_busy_builtins_zygote_runs_from_its_start(
    tmp_path, monkeypatch
):
    """A built-ins' zygote that stays busy (its preload spins) delays the starts of its first
    wait_max_s seconds only: once the cap has run out, from the zygote's start, later starts
    take the pool at once. Before: each start waited the whole cap again (3 s each here),
    i.e. up to 30 s on every cold start of a built-in for the zygote's 120 s."""
    from hearth.functions.fedavg.tree import plan_tree

    # the zygote works all along: only the cap ends the wait (3 s, not less: the first start
    # must come within it on a busy node)
    runner = zygote_runner(tmp_path, monkeypatch, "zcap", SPIN, wait_s=30.0, wait_max_s=3.0)
    (spec,) = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix="zc").function_specs(
        model_bytes=1 << 16
    )
    try:
        runner.prepare(spec)  # the built-ins' zygote starts (and spins)
        await booting_pid(runner, BUILTINS_KEY)
        fork, first = await runner.fork_preloaded(spec)  # waits until the cap runs out
        assert not fork and "still starting after 3 s" in first["zygote_fallback"], first
        assert first["zygote_wait_ms"] > 0
        for _ in range(2):  # later starts: no wait at all
            fork, later = await runner.fork_preloaded(spec)
            assert not fork and "zygote_wait_ms" not in later, later
            assert "still starting after 3 s" in later["zygote_fallback"]
        assert runner.status()[BUILTINS_KEY]["state"] == "starting"  # still spinning
    finally:
        kill_all(zygotes_of_mine())
        await runner.close()


async def test_a_zygote_whose_start_failed_is_not_started_again_at_once(tmp_path, monkeypatch):
    """After a zygote's start failed (its start timeout, patched to 1 s), starts within
    retry_s (4 s here) are plain processes at once, with no new zygote; after it, a
    start tries a new zygote. Before: each start started a fresh zygote and waited for it
    again, up to 120 s each."""
    monkeypatch.setattr(zygote_server, "START_TIMEOUT_S", 1.0)
    runner = zygote_runner(tmp_path, monkeypatch, "zretry", SPIN, retry_s=4.0)
    try:
        first = asyncio.create_task(runner.zygote(POOL_RUNTIME))
        pid = await booting_pid(runner, POOL_RUNTIME)
        assert await first is None and await zygote_gone(pid)  # timed out, stopped
        failed = runner._starting[POOL_RUNTIME]
        for _ in range(2):
            inst, _ = await asyncio.wait_for(runner.spawn(None, "local"), 10)
            assert not isinstance(inst, ForkedInstance) and inst.proc is not None
            assert runner._starting[POOL_RUNTIME] is failed  # no new zygote was started
            assert POOL_RUNTIME not in runner._booting and zygotes_of_mine() == set()
        await asyncio.sleep(4.0)  # the retry delay has passed: the next start tries again
        again = asyncio.create_task(runner.zygote(POOL_RUNTIME))
        assert await booting_pid(runner, POOL_RUNTIME) != pid
        assert await again is None
    finally:
        kill_all(zygotes_of_mine())
        await runner.close()


# imported by every zygote of the runner: the built-ins' one never comes up (asleep: no progress)
HANG_BUILTINS = """
import sys
import time

if any("fedavg" in a for a in sys.argv):
    time.sleep(300)
"""


async def test_a_builtins_start_without_a_pool_instance_waits_by_the_same_rule(
    tmp_path, monkeypatch
):
    """A start of a built-in with no pool instance to take (Runner.spawn) waits for the
    built-ins' zygote by the same rule as one with a pool instance (zygote_wait: here 1 s
    without progress), then starts as a plain process. Before: it waited for the zygote up to
    its start timeout (120 s; the test gives up at 20 s)."""
    from hearth.functions.fedavg.tree import plan_tree

    runner = zygote_runner(tmp_path, monkeypatch, "zspawn", HANG_BUILTINS, wait_s=1.0)
    (spec,) = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix="zsp").function_specs(
        model_bytes=1 << 16
    )
    try:
        inst, _ = await asyncio.wait_for(runner.spawn(spec, "local"), 20)
        assert not isinstance(inst, ForkedInstance) and inst.proc is not None  # a plain process
        assert runner.status()[BUILTINS_KEY]["state"] == "starting"  # still asleep
    finally:
        kill_all(zygotes_of_mine())
        await runner.close()
