"""A node's close gives hung instances their stop grace all at once: two hung pods of two
functions cost one grace, not one each (`Lifecycle.close`; before 7 Dec 2026 it stopped one
function's instances after another's). Through a real node in this process
(`hearth.up.Platform`: proxy, slot pool, Redis, join socket) and two real pods
(`python -m hearth.runtime.pod` processes) joined over its socket, then stopped (SIGSTOP):
they neither answer the data-plane shutdown nor close their end."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from call_outcomes import TOKEN, until
from hearth.config import Settings
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform
from test_pod_join import SPEC, pod

pytestmark = pytest.mark.asyncio

GRACE_S = 2.0  # the test's stop grace (the node's is 10 s)


async def test_hung_pods_of_two_functions_close_in_one_grace(redis_server, monkeypatch):
    state = Path(tempfile.mkdtemp(prefix="hearth-closegr-"))
    sock_dir = state / "sock"
    monkeypatch.setenv("HEARTH_NODE_SOCKET_DIR", str(sock_dir))
    s = Settings.from_env(port=free_port(), redis_url=redis_server.url, dataplane_mode="unix")
    s.state, s.admin_token = state / "state", TOKEN
    p = Platform(s)
    pods = []
    try:
        await p.start()
        agent = p.agent
        agent.lifecycle.stop_grace_s = GRACE_S
        for k in range(2):
            await agent.deploy(parse_spec({**SPEC, "name": f"closegr-{k}"}))
            ready = state / f"ready-{k}"
            pods.append(pod(sock_dir, f"closegr-pod-{k}", f"closegr-{k}", ready))
            await until(ready.exists, f"pod {k} joined and registered", timeout=60)
        assert all(len(agent.functions[f"closegr-{k}"].instances) == 1 for k in range(2))
        for q in pods:
            os.kill(q.pid, signal.SIGSTOP)  # hung: no answer to the shutdown, its end kept open
        t0 = time.monotonic()
        await p.stop()
        took = time.monotonic() - t0
        # each pod's stop waited its grace (they are hung), side by side: one grace in all
        # (before: one per function, 2 * GRACE_S and more)
        assert GRACE_S <= took < 1.5 * GRACE_S, took
    finally:
        await p.stop()
        for q in pods:
            os.kill(q.pid, signal.SIGCONT)
            q.kill()
            q.wait()
        shutil.rmtree(state, ignore_errors=True)
