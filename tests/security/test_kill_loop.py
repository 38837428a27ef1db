"""Restart after a crash: `hearth up` is SIGKILLed 20 times in a row while a stream trigger is
busy, and started again each time on the same state directory, port and external Redis.

Each time it answers /healthz within 5 s (or three clean starts of the same run, on a loaded
machine), and leaves no instance, proxy daemon, redis-server or
shared-memory segment behind once killed; at the end every published event has been handled
(at least once) and nothing is pending."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from hearth.localnode import start_node
from hearth.queue.examples import record_key
from hearth.queue.producer import publish_sync
from hearth.redis_server import free_port
from sec_helpers import TOKEN

ROUNDS = 20
HEALTHY_WITHIN_S = 5.0


def _ours(state: Path) -> list[int]:
    """Processes that belong to the node with this state directory (not `hearth up` itself)."""
    key = str(state).encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except OSError:
            continue
        if stat[2] == "Z":
            continue
        if b"hearth.runtime.instance" in cmd or b"hearth.proxies.daemon" in cmd:
            if key in cmd or key in env:
                out.append(int(pid))
        elif b"redis-server" in cmd and key in cmd:
            out.append(int(pid))
    return out


def _segments(port: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n == f"hearth-local-{port}"]


def _creator_alive(port: int) -> bool:
    from hearth.dataplane.segment import pid_alive, segment_info

    info = segment_info(f"/dev/shm/hearth-local-{port}")
    return info is not None and pid_alive(info["creator_pid"], info["creator_start"])


@pytest.mark.slow
def test_sigkill_loop_under_stream_load(redis_server, tmp_path):
    url = redis_server.url
    stream = f"kill-loop-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(url)
    r.delete(stream, record_key(stream))
    state, port = tmp_path / "state", free_port()
    spec = {
        "name": "rec",
        "handler": "hearth.queue.examples:record",
        "env": {"RECORD_REDIS_URL": url},
        "concurrency": 4,
        "max_instances": 2,
        "triggers": [
            # every kill counts as a delivery of what was in flight: allow the crash loop's
            # worth of them, so what is checked is loss, not the dead-letter policy
            {
                "type": "redis-stream",
                "stream": stream,
                "claim_idle_s": 1.0,
                "backoff_s": 0.05,
                "max_deliveries": 1000,
            }
        ],
    }
    published: list[str] = []
    stop = threading.Event()

    def publisher() -> None:
        pr = redis.Redis.from_url(url)
        while not stop.is_set():
            published.append(publish_sync(pr, stream, {"n": len(published)}))
            time.sleep(0.005)

    pub = threading.Thread(target=publisher, daemon=True)
    startup: list[float] = []  # the first start, then the restarts after each SIGKILL
    clean: list[float] = []  # starts on a fresh state dir: the first one and a reference
    node = None
    try:
        for i in range(ROUNDS + 1):
            t0 = time.monotonic()
            node = start_node(state, redis_url=url, token=TOKEN, dataplane="unix", port=port)
            startup.append(time.monotonic() - t0)
            if i == 0:
                clean.append(startup[0])
                node.client.deploy(spec)
                pub.start()
            if i == ROUNDS:
                break
            t_busy = time.monotonic()  # let it take events (and instances start) before the kill
            while time.monotonic() - t_busy < 0.5:
                time.sleep(0.05)
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
            for _ in range(100):  # instances die with it; the proxy within its poll interval
                if not _ours(state):
                    break
                time.sleep(0.05)
            assert _ours(state) == [], f"round {i}: processes left behind"
            assert not _creator_alive(port), f"round {i}: a live pool segment"
        stop.set()
        pub.join(10)
        want = set(published)
        t0 = time.monotonic()
        done: set[str] = set()
        while time.monotonic() - t0 < 120:
            done = {x.split()[0].decode() for x in r.lrange(record_key(stream), 0, -1)}
            if want <= done:
                break
            time.sleep(0.2)
        assert not (want - done), f"{len(want - done)} of {len(want)} events never handled"
        group = r.xinfo_groups(stream)[0]
        assert int(group["pending"]) == 0
        assert r.xlen(stream + ":dlq") == 0  # nothing dead-lettered either
        # a reference: a clean start now (fresh state dir and port, the same Redis and
        # registry), so the bound follows the machine's load at both ends of the run
        t0 = time.monotonic()
        start_node(tmp_path / "ref", redis_url=url, token=TOKEN, dataplane="unix").stop()
        clean.append(time.monotonic() - t0)
    finally:
        stop.set()
        if node is not None:
            node.stop()
        r.delete(stream, stream + ":dlq", record_key(stream))
    assert _ours(state) == [] and _segments(port) == []
    print(
        "startup seconds:", [round(x, 2) for x in startup], "clean:", [round(x, 2) for x in clean]
    )
    # The 5 s holds here with margin on a quiet machine (measured 2026-12-06: restarts
    # 1.0-3.0 s, median 2 s; start is interpreter + imports), but on this shared VM load bursts
    # stretch starts: single restarts to 5-6.4 s at load 8, a run of them to 16-18 s (clean start
    # 8.6 s) at load 20. So a restart may take 5 s or three times the slower clean start of this
    # run (the first, and a reference taken after the loop), whichever is more. Only clean
    # starts scale the bound, never the restarts under test: restarts that are all slow (the
    # bug: 20-60 s, or never -- start_node's own 60 s timeout) still fail it.
    limit = max(HEALTHY_WITHIN_S, 3 * max(clean))
    slow = [f"{x:.1f}s" for x in startup[1:] if x > limit]
    assert not slow, f"restarts slower than {limit:.1f}s: {slow} (all: {startup}, clean: {clean})"
