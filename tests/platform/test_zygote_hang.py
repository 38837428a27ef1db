"""A ready zygote that stops answering forks (SIGSTOP here; a hang in general) fails the start
that asked it only, after HEARTH_ZYGOTE_FORK_TIMEOUT_S: that start goes on as a plain process,
the instances it forked earlier keep serving (killing it would kill them: they die with it), it
forks no more, a child of a given-up fork is killed and reaped, and once none of its instances is
left it is stopped and replaced. And a start with no pool instance waits for any zygote still
coming up by the built-ins' rule, not up to its 120 s start timeout. Real zygote processes, and a
real `hearth up`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import pytest
from hearth.agent.instance import POOL_RUNTIME, ForkedInstance
from hearth.localnode import start_node
from hearth.spec import FunctionSpec
from zygote_procs import booting_pid, kill_all, zygote_gone, zygote_runner, zygotes_of_mine

SLACK_S = 15.0  # a plain process's start on a loaded 2-core machine, on top of the bound


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it is an exit not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def _children(ppid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[1]) == ppid and fields[0] != b"Z":
                out.add(int(d))
    return out


async def test_a_stopped_zygote_fails_that_start_only_and_is_replaced(tmp_path, monkeypatch):
    """A ready zygote stopped (SIGSTOP) before a fork: the start goes on as a plain process
    after the bound (1 s here); with no instance of its left, the zygote is stopped at once;
    starts within retry_s are plain processes, the next one past it forks from a new zygote.
    Before: the spawn waited for the fork's answer for ever (the test's 30 s bound). retry_s
    is longer than the waits below can take together (10 s + 30 s): the second start is
    within it however slow the machine; its passing is then set by moving the failure's
    stamp back, not waited for."""
    retry_s = 60.0
    runner = zygote_runner(tmp_path, monkeypatch, "zhang", fork_timeout_s=1.0, retry_s=retry_s)
    z = await runner.zygote(POOL_RUNTIME)
    assert z is not None and z.proc is not None
    hung = z.proc.pid
    os.kill(hung, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        inst, _ = await asyncio.wait_for(runner.spawn(None, "local"), 30)
        stopped = time.monotonic()  # (it was stopped before the spawn returned)
        assert stopped - t0 < 1.0 + SLACK_S
        assert not isinstance(inst, ForkedInstance) and inst.proc is not None  # a plain process
        assert z.hung and "did not answer a fork in 1 s" in z.hung
        assert await zygote_gone(hung)  # none of its instances left: stopped (not held stopped)
        assert runner.status()[POOL_RUNTIME]["state"] == "gone"
        failed_at = runner._failed[POOL_RUNTIME]  # stopped: it counts as a failed start
        again, _ = await asyncio.wait_for(runner.spawn(None, "local"), 30)
        assert not isinstance(again, ForkedInstance)  # within retry_s: no new zygote yet
        assert zygotes_of_mine() == set() and runner._failed[POOL_RUNTIME] == failed_at
        runner._failed[POOL_RUNTIME] = failed_at - retry_s  # retry_s has passed
        forked, _ = await asyncio.wait_for(runner.spawn(None, "local"), 60)
        assert isinstance(forked, ForkedInstance)  # from a new zygote
        assert runner.zygotes[POOL_RUNTIME] is not z and runner.status()[POOL_RUNTIME]["state"] == (
            "ready"
        )
    finally:
        kill_all(zygotes_of_mine() | {hung})
        await runner.close()


async def _blocked_child(runner, z, fifo) -> ForkedInstance:
    """An instance forked by `z` that blocks opening its log (a FIFO with no reader): it lives
    until it is killed, as a serving instance would."""
    inst = runner._new(
        None,
        "local",
        None,
        ForkedInstance,
        exit_code=asyncio.get_running_loop().create_future(),
    )
    await z.fork(inst, {"boot": {}, "env": {}, "log": str(fifo)}, [])
    return inst


async def test_a_hung_zygote_is_kept_while_its_instance_lives(tmp_path, monkeypatch):
    """A zygote stopped (SIGSTOP) while an instance of its own lives: the start that asked it
    for a fork goes on as a plain process, and so do later ones, at once; the zygote is not
    killed (its instance would die with it). That instance then ends: the stopped zygote can
    neither reap nor report it, the agent sees it through its pidfd, and the zygote is stopped
    then. Before this fix, the start waited for ever; with the fork bound alone, the zygote was
    never stopped (its instance's end was never reported)."""
    runner = zygote_runner(tmp_path, monkeypatch, "zkeep", fork_timeout_s=1.0, retry_s=60.0)
    z = await runner.zygote(POOL_RUNTIME)
    assert z is not None and z.proc is not None
    hung = z.proc.pid
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    child = await _blocked_child(runner, z, fifo)
    os.kill(hung, signal.SIGSTOP)
    try:
        inst, _ = await asyncio.wait_for(runner.spawn(None, "local"), 30)
        assert not isinstance(inst, ForkedInstance)  # a plain process
        assert z.hung and not z.dead and runner.status()[POOL_RUNTIME]["state"] == "hung"
        assert _alive(child.os_pid) and _alive(hung)  # neither killed
        asked = set(z.given_up)  # the fork given up
        again, _ = await asyncio.wait_for(runner.spawn(None, "local"), 30)
        assert not isinstance(again, ForkedInstance)
        assert z.given_up == asked and not z.forks  # no fork asked of it (no wait for the bound)
        os.kill(child.os_pid, signal.SIGKILL)  # its instance ends (a zombie: nobody reaps it)
        assert await asyncio.wait_for(child.exited(), 20) == -1  # (its code is unknown)
        assert await zygote_gone(hung)  # none of its instances left: stopped
        assert runner.status()[POOL_RUNTIME]["state"] == "gone"  # (retry_s: none new yet)
    finally:
        kill_all(zygotes_of_mine() | {hung})
        await runner.close()


async def test_a_child_of_a_given_up_fork_is_killed_and_reaped(tmp_path, monkeypatch):
    """A zygote that read a fork request before its deadline and hung before answering forks
    the child late, after its start went on without it: the agent kills that child (the zygote
    reaps it) instead of leaving an instance nobody knows of. The request is sent here as such a
    one (no deadline, marked given up); its child blocks opening its log (a FIFO with no reader),
    so only a kill ends it. Before: it lived on (its endpoint with it)."""
    runner = zygote_runner(tmp_path, monkeypatch, "zlate", fork_timeout_s=1.0)
    z = await runner.zygote(POOL_RUNTIME)
    assert z is not None and z.sock is not None
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    children: set[int] = set()
    try:
        z.given_up.add("late-1")
        req = {"op": "fork", "id": "late-1", "boot": {}, "env": {}, "log": str(fifo)}
        socket.send_fds(z.sock, [json.dumps(req).encode()], [])
        deadline = time.monotonic() + 20
        while z.given_up or z.late:  # its pid came (and was killed), then its exit
            assert time.monotonic() < deadline, (z.given_up, z.late)
            children |= _children(z.proc.pid)
            await asyncio.sleep(0.02)
        assert not _children(z.proc.pid) and not z.running
        assert all(not _alive(pid) for pid in children)
        assert not z.hung and not z.dead  # the zygote itself is fine
    finally:
        kill_all(children)
        kill_all(zygotes_of_mine())
        await runner.close()


async def test_a_fork_request_read_past_its_deadline_is_refused(tmp_path, monkeypatch):
    """A zygote that reads a fork request after its deadline (it was stopped meanwhile, and
    the start went on without it) answers with an error and forks no child at all. The child
    would block opening its log (a FIFO with no reader). Before: it forked it."""
    from hearth.agent.zygote_server import ZygoteError

    runner = zygote_runner(tmp_path, monkeypatch, "zdead")
    z = await runner.zygote(POOL_RUNTIME)
    assert z is not None and z.sock is not None and z.proc is not None
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    try:
        inst = runner._new(None, "local", "stale-1", ForkedInstance)
        fut = asyncio.get_running_loop().create_future()
        z.forks["stale-1"] = (fut, inst)
        req = {
            "op": "fork",
            "id": "stale-1",
            "deadline": time.monotonic() - 0.5,
            "boot": {},
            "env": {},
            "log": str(fifo),
        }
        socket.send_fds(z.sock, [json.dumps(req).encode()], [])
        with pytest.raises(ZygoteError, match="past its deadline"):
            await asyncio.wait_for(fut, 20)
        assert not _children(z.proc.pid)
    finally:
        kill_all(_children(z.proc.pid) | zygotes_of_mine())
        await runner.close()


# imported by every zygote of the runner first: the `colorsys` preload's zygote never comes up,
# asleep (no progress) or spinning (progress without end)
HANG_PRELOAD = """
import sys
import time

if any("colorsys" in a for a in sys.argv):
    time.sleep(300)
"""
SPIN_PRELOAD = """
import sys
import time

t0 = time.monotonic()
while any("colorsys" in a for a in sys.argv) and time.monotonic() - t0 < 300:
    pass
"""


@pytest.mark.parametrize(
    "first, kw, why",
    [
        (HANG_PRELOAD, {"wait_s": 1.0}, "no progress for 1 s"),
        (SPIN_PRELOAD, {"wait_s": 30.0, "wait_max_s": 2.0}, "still starting after 2 s"),
    ],
    ids=["asleep", "spinning"],
)
async def test_a_start_waits_for_a_preload_zygote_by_the_builtins_rule(
    tmp_path, monkeypatch, caplog, first, kw, why
):
    """A start with no pool instance whose `preload` zygote is still coming up waits for it by
    the built-ins' rule (wait_s without progress, wait_max_s from its start), then starts as a
    plain process. Before: it waited up to the zygote's 120 s start timeout (the test gives up
    at 20 s)."""
    runner = zygote_runner(tmp_path, monkeypatch, "zpre", first, **kw)
    spec = FunctionSpec(name="zpre", handler="colorsys:rgb_to_hsv", preload=["colorsys"])
    try:
        runner.prepare(spec)  # its zygote starts (and never comes up)
        await booting_pid(runner, "preload:colorsys")
        inst, _ = await asyncio.wait_for(runner.spawn(spec, "local"), 20)
        assert not isinstance(inst, ForkedInstance) and inst.proc is not None  # a plain process
        assert runner.status()["preload:colorsys"]["state"] == "starting"
        assert any(why in r.getMessage() for r in caplog.records), caplog.text
    finally:
        kill_all(zygotes_of_mine())
        await runner.close()


PROBE = """
import os


def probe(event):
    ppid = os.getppid()
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        parent = f.read().replace(b"\\0", b" ").decode()
    return {"pid": os.getpid(), "ppid": ppid, "parent": parent}
"""


def test_a_hung_zygote_keeps_its_instances_and_is_replaced_once_they_end(tmp_path, redis_url):
    """On a real node (HEARTH_ZYGOTE_FORK_TIMEOUT_S=2): the zygote of two functions is stopped
    (SIGSTOP) after it forked the first one's instance. The second one's cold start completes
    as a plain process within the bound (and slack); the first instance keeps serving (the
    zygote is not killed); /v1/status says the zygote is hung. SIGCONT: the request it was sent
    is refused (past its deadline), no child of it comes. Once the first instance has ended the
    zygote is stopped, and a new one forks the next start. Before: the second call waited for
    the fork for ever (the client's 60 s timeout)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "zyg_hang_probe.py").write_text(PROBE)

    def spec(name: str) -> dict:
        return {
            "name": name,
            "handler": "zyg_hang_probe:probe",
            "code_path": str(code),
            "preload": ["colorsys"],
        }

    def call(c, name: str) -> dict:
        r = c.invoke(name, b"")
        assert r.status == 200, r.body
        return json.loads(r.body)

    env = {"HEARTH_ZYGOTE_FORK_TIMEOUT_S": "2", "HEARTH_ZYGOTE_RETRY_S": "0"}
    with start_node(tmp_path / "zh", redis_url=redis_url, env=env) as node:
        c = node.client
        c.deploy(spec("hang-a"))
        c.deploy(spec("hang-b"))
        a = call(c, "hang-a")
        zyg = a["ppid"]
        assert "hearth.runtime.zygote" in a["parent"] and zyg != node.proc.pid
        key = next(k for k, z in c.status()["zygotes"].items() if z.get("pid") == zyg)
        os.kill(zyg, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            b = call(c, "hang-b")
            assert time.monotonic() - t0 < 2.0 + SLACK_S
            assert b["ppid"] == node.proc.pid  # a plain process, started by the agent
            assert call(c, "hang-a")["pid"] == a["pid"]  # the earlier instance still serves
            hung = c.status()["zygotes"][key]
            assert hung["state"] == "hung" and "did not answer a fork in 2 s" in hung["hung"], hung
        finally:
            try:
                os.kill(zyg, signal.SIGCONT)
            except ProcessLookupError:
                pass  # (killed: and its instances with it)
        # the request it read late was refused: no child of it but the first instance
        time.sleep(1.0)
        assert _children(zyg) == {a["pid"]}
        assert c.status()["zygotes"][key]["state"] == "hung"  # forks no more, still
        c.delete("hang-a")  # its last instance ends: the zygote is stopped
        deadline = time.monotonic() + 30
        while _alive(zyg) or _alive(a["pid"]):
            assert time.monotonic() < deadline, "the hung zygote was not stopped"
            time.sleep(0.05)
        c.deploy(spec("hang-c"))
        again = call(c, "hang-c")  # from a new zygote (retry delay 0 here)
        assert "hearth.runtime.zygote" in again["parent"] and again["ppid"] != zyg
        assert c.status()["zygotes"][key]["state"] == "ready"
