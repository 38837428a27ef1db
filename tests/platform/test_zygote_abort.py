"""A zygote that misses its start timeout is stopped (hearth.agent.zygote_server.Zygote.abort),
and starts wait for a built-ins' zygote that keeps working only until the cap after its start:
real zygote processes whose preload spins, a start timeout patched down to seconds."""

from __future__ import annotations

import asyncio
import os
import time

import hearth.agent.zygote as zygote
import hearth.agent.zygote_server as zygote_server
from hearth.agent.instance import POOL_RUNTIME, ForkedInstance
from hearth.agent.zygote import BUILTINS_KEY, ZygoteRunner

# imported by the zygote first (the node's HEARTH_ZYGOTE_PRELOAD): works (CPU) for a minute, so
# the zygote never reports ready within the patched start timeout
SPIN = """
import time

t0 = time.monotonic()
while time.monotonic() - t0 < 60:
    pass
"""


def _zygotes_of_mine() -> set[int]:
    """Live zygote processes this test process started."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == os.getpid() and fields[0] != b"Z" and b"hearth.runtime.zygote" in cmd:
            out.add(int(d))
    return out


def _runner(tmp_path, monkeypatch, name: str, first: str | None = None, **kw) -> ZygoteRunner:
    """A ZygoteRunner of real zygotes (no proxy: the instances it starts exit at once) whose
    zygotes import the module `first` (its source) before anything else, if given."""
    preload = None
    if first is not None:
        (tmp_path / "zygote_first.py").write_text(first)
        path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
        monkeypatch.setenv("PYTHONPATH", path)
        preload = ["zygote_first"]
    return ZygoteRunner(
        None,
        preload=preload,
        pool_name=name,
        proxy_socket=str(tmp_path / "none.sock"),
        log_dir=None,
        on_started=lambda inst: None,
        on_exit=lambda *a: None,
        **kw,
    )


async def _booting_pid(runner: ZygoteRunner, key: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        z = runner._booting.get(key)
        if z is not None and z.proc is not None:
            return z.proc.pid
        await asyncio.sleep(0.02)
    raise AssertionError("the zygote was not spawned")


async def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pid not in _zygotes_of_mine():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_zygote_that_misses_its_start_timeout_is_stopped(tmp_path, monkeypatch):
    """Before: the timed-out zygote kept spinning with its control socket open, its state read
    gone, and each later trigger (a cold start here) started one more beside it."""
    monkeypatch.setattr(zygote_server, "START_TIMEOUT_S", 2.0)
    monkeypatch.setattr(zygote, "ZYGOTE_RETRY_S", 0.0)  # each cold start tries again
    runner = _runner(tmp_path, monkeypatch, "zabort", SPIN)
    pids: list[int] = []
    try:
        for _ in range(2):  # two cold starts, each finding no zygote ready
            got = asyncio.create_task(runner.zygote(POOL_RUNTIME))
            pids.append(await _booting_pid(runner, POOL_RUNTIME))
            assert _zygotes_of_mine() == {pids[-1]}  # only the one starting now
            assert await got is None  # timed out: the start goes on as a plain process
            assert runner.status()[POOL_RUNTIME]["state"] == "gone"
            assert await _gone(pids[-1]), f"zygote {pids[-1]} still runs after its timeout"
        assert pids[0] != pids[1] and _zygotes_of_mine() == set()
    finally:
        for pid in _zygotes_of_mine():
            os.kill(pid, 9)
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
    runner = _runner(tmp_path, monkeypatch, "zcap", SPIN, wait_s=30.0, wait_max_s=3.0)
    (spec,) = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix="zc").function_specs(
        model_bytes=1 << 16
    )
    try:
        runner.prepare(spec)  # the built-ins' zygote starts (and spins)
        await _booting_pid(runner, BUILTINS_KEY)
        fork, first = await runner.fork_preloaded(spec)  # waits until the cap runs out
        assert not fork and "still starting after 3 s" in first["zygote_fallback"], first
        assert first["zygote_wait_ms"] > 0
        for _ in range(2):  # later starts: no wait at all
            fork, later = await runner.fork_preloaded(spec)
            assert not fork and "zygote_wait_ms" not in later, later
            assert "still starting after 3 s" in later["zygote_fallback"]
        assert runner.status()[BUILTINS_KEY]["state"] == "starting"  # still spinning
    finally:
        for pid in _zygotes_of_mine():
            os.kill(pid, 9)
        await runner.close()


async def test_a_zygote_whose_start_failed_is_not_started_again_at_once(tmp_path, monkeypatch):
    """After a zygote's start failed (its start timeout, patched to 1 s), starts within
    ZYGOTE_RETRY_S (4 s here) are plain processes at once, with no new zygote; after it, a
    start tries a new zygote. Before: each start started a fresh zygote and waited for it
    again, up to 120 s each."""
    monkeypatch.setattr(zygote_server, "START_TIMEOUT_S", 1.0)
    monkeypatch.setattr(zygote, "ZYGOTE_RETRY_S", 4.0)
    runner = _runner(tmp_path, monkeypatch, "zretry", SPIN)
    try:
        first = asyncio.create_task(runner.zygote(POOL_RUNTIME))
        pid = await _booting_pid(runner, POOL_RUNTIME)
        assert await first is None and await _gone(pid)  # timed out, stopped
        failed = runner._starting[POOL_RUNTIME]
        for _ in range(2):
            inst, _ = await asyncio.wait_for(runner.spawn(None, "local"), 10)
            assert not isinstance(inst, ForkedInstance) and inst.proc is not None
            assert runner._starting[POOL_RUNTIME] is failed  # no new zygote was started
            assert POOL_RUNTIME not in runner._booting and _zygotes_of_mine() == set()
        await asyncio.sleep(4.0)  # the retry delay has passed: the next start tries again
        again = asyncio.create_task(runner.zygote(POOL_RUNTIME))
        assert await _booting_pid(runner, POOL_RUNTIME) != pid
        assert await again is None
    finally:
        for pid in _zygotes_of_mine():
            os.kill(pid, 9)
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

    runner = _runner(tmp_path, monkeypatch, "zspawn", HANG_BUILTINS, wait_s=1.0)
    (spec,) = plan_tree({"node-0": 2}, fan_in=2, levels=1, prefix="zsp").function_specs(
        model_bytes=1 << 16
    )
    try:
        inst, _ = await asyncio.wait_for(runner.spawn(spec, "local"), 20)
        assert not isinstance(inst, ForkedInstance) and inst.proc is not None  # a plain process
        assert runner.status()[BUILTINS_KEY]["state"] == "starting"  # still asleep
    finally:
        for pid in _zygotes_of_mine():
            os.kill(pid, 9)
        await runner.close()
