"""How long hung instances hold a node's close or a stop, through a real node in this process
(`hearth.up.Platform`: proxy, slot pool, Redis, zygote, join socket), real instance processes
and real pods (`python -m hearth.runtime.pod` processes joined over its socket), made to hang
with SIGSTOP: they neither answer the data-plane shutdown nor exit by themselves.

- The close gives hung instances their stop grace all at once: two of two functions cost one
  grace, not one each (`Lifecycle.close`; before 7 Dec 2026 it stopped one function's instances
  after another's).
- Hung pods do not hold the close: the join server's close (first, `Platform.stop`) closes their
  connections, which ends them (`JoinServer._watch`); before, nothing ended them then, and the
  close waited a stop grace for each function's pods.
- A hung pod stopped (keep-alive, the controller) is cut off after the stop grace and then the
  kill's `KILL_GRACE_S`, and counted gone: before, the stop's bounded wait cancelled the pod's
  `gone` (`JoinedInstance.exited`), so its kill found it not running and never cut it off."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from call_outcomes import TOKEN, until
from hearth.agent import join
from hearth.config import Settings
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform
from test_pod_join import SPEC, pod

pytestmark = pytest.mark.asyncio

GRACE_S = (
    3.0  # the tests' stop grace (the node's is 10 s); one grace or two differ by 3 s, a margin
)
# of 1.5 s either way on a loaded machine


@contextlib.asynccontextmanager
async def _node(redis_url: str, monkeypatch) -> AsyncIterator[tuple[Platform, Path]]:
    """A started node with the test's stop grace, and its socket directory (where pods join);
    stopped (again: a no-op if the test did) and removed at the end."""
    state = Path(tempfile.mkdtemp(prefix="hearth-closegr-"))
    monkeypatch.setenv("HEARTH_NODE_SOCKET_DIR", str(state / "sock"))
    s = Settings.from_env(port=free_port(), redis_url=redis_url, dataplane_mode="unix")
    s.state, s.admin_token = state / "state", TOKEN
    p = Platform(s)
    try:
        await p.start()
        p.agent.lifecycle.stop_grace_s = GRACE_S
        yield p, state / "sock"
    finally:
        await p.stop()
        shutil.rmtree(state, ignore_errors=True)


async def _hung_pods(p: Platform, sock_dir: Path, n: int, procs: list) -> None:
    """`n` pods of `n` functions joined, registered, then stopped (SIGSTOP)."""
    for k in range(n):
        await p.agent.deploy(parse_spec({**SPEC, "name": f"closegr-{k}"}))
        ready = sock_dir.parent / f"ready-{k}"
        procs.append(pod(sock_dir, f"closegr-pod-{k}", f"closegr-{k}", ready))
        await until(ready.exists, f"pod {k} joined and registered", timeout=60)
    for q in procs:
        os.kill(q.pid, signal.SIGSTOP)


def _end(procs: list[subprocess.Popen]) -> None:
    for q in procs:
        if q.poll() is None:
            os.kill(q.pid, signal.SIGCONT)
            q.kill()
        q.wait()


async def test_hung_instances_of_two_functions_close_in_one_grace(redis_server, monkeypatch):
    async with _node(redis_server.url, monkeypatch) as (p, _):
        agent, pids = p.agent, []
        for k in range(2):
            await agent.deploy(parse_spec({**SPEC, "name": f"closegr-{k}"}))
            res = await agent.invoke(
                f"closegr-{k}", b'{"name": "x"}', content_type="application/json"
            )
            assert res.status == 200
            (inst,) = agent.functions[f"closegr-{k}"].instances.values()
            pids.append(inst.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # hung (the kill after the grace ends it all the same)
        t0 = time.monotonic()
        await p.stop()
        took = time.monotonic() - t0
        # each instance's stop waited its grace, side by side: one grace in all (before: one
        # per function, 2 * GRACE_S and more)
        assert GRACE_S <= took < 1.5 * GRACE_S, took


async def test_hung_pods_do_not_hold_the_close(redis_server, monkeypatch):
    procs: list[subprocess.Popen] = []
    try:
        async with _node(redis_server.url, monkeypatch) as (p, sock_dir):
            await _hung_pods(p, sock_dir, 2, procs)
            t0 = time.monotonic()
            await p.stop()
            took = time.monotonic() - t0
            # their connections closed with the join server: gone, no grace waited for them
            # (before: a stop grace for each function's pods, 2 * GRACE_S)
            assert took < GRACE_S / 2, took
    finally:
        _end(procs)


async def test_a_hung_pod_stopped_is_cut_off_after_its_graces(redis_server, monkeypatch):
    monkeypatch.setattr(join, "KILL_GRACE_S", 1.0)  # (the node's is 5 s)
    procs: list[subprocess.Popen] = []
    try:
        async with _node(redis_server.url, monkeypatch) as (p, sock_dir):
            await _hung_pods(p, sock_dir, 1, procs)
            agent = p.agent
            t0 = time.monotonic()
            # (as the controller's graceful stop, or a keep-alive stop: `Lifecycle.stop`)
            stopped = await asyncio.wait_for(
                agent.lifecycle.stop_instance("closegr-pod-0"), 4 * GRACE_S
            )
            took = time.monotonic() - t0
            assert stopped
            # the stop's grace, then the kill's: cut off, counted gone
            assert GRACE_S + 1.0 <= took < GRACE_S + 1.0 + GRACE_S / 2, took
            assert agent.table.find("closegr-pod-0") is None
            assert "closegr-pod-0" not in [
                i["id"] for i in agent.status()["functions"]["closegr-0"]["instances"]
            ]
            os.kill(procs[0].pid, signal.SIGCONT)
            assert procs[0].wait(10) == 0  # it reads the EOF the kill sent, and exits
    finally:
        _end(procs)
