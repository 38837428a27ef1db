"""H2 and M9: the private Redis is reachable only by the owner, and dies with its node."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest
import redis
from hearth.localnode import start_node
from sec_helpers import listening_tcp_ports


def _redis_pid(state) -> int:
    return int((state / "redis" / "redis.pid").read_text().strip())


def test_private_redis_has_no_tcp_port_and_owner_only_socket(private_node):
    url = (private_node.state / "redis-url").read_text().strip()
    assert url.startswith("unix://"), url
    sock = url.removeprefix("unix://").split("?")[0]
    assert stat.S_IMODE(os.stat(private_node.state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
    assert listening_tcp_ports(_redis_pid(private_node.state)) == set()
    assert redis.Redis.from_url(url).ping()  # the owner gets in


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_another_local_user_cannot_reach_the_registry(private_node):
    url = (private_node.state / "redis-url").read_text().strip()
    # plain sockets (no imports from the venv): what any local user could run
    code = (
        "import socket, sys, urllib.parse\n"
        f"u = urllib.parse.urlsplit({url!r})\n"
        "try:\n"
        "    if u.scheme == 'unix':\n"
        "        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(u.path)\n"
        "    else:\n"
        "        s = socket.create_connection((u.hostname, u.port), timeout=2)\n"
        "    s.sendall(b'HSET hearth:functions evil x\\r\\n')\n"
        "    reply = s.recv(100)\n"
        "except OSError as e:\n"
        "    print('refused:', type(e).__name__); sys.exit(3)\n"
        "print('reply', reply); sys.exit(0 if reply.startswith(b':') else 3)\n"
    )
    import sys

    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 3 and "refused" in r.stdout, r.stdout + r.stderr
    assert redis.Redis.from_url(url).hget("hearth:functions", "evil") is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_sigkilled_node_leaves_no_redis_and_restarts_on_one_server(tmp_path):
    node = start_node(tmp_path / "st", redis_url=None, dataplane="unix")
    first = _redis_pid(node.state)
    node.client.deploy({"name": "keep", "handler": "hearth.functions.examples.handlers:noop"})
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    for _ in range(200):  # up to 10 s; it goes within a few ms
        if not _alive(first):
            break
        time.sleep(0.05)
    assert not _alive(first), "redis-server outlived its SIGKILLed node"
    again = start_node(tmp_path / "st", redis_url=None, dataplane="unix", token=node.token)
    try:
        second = _redis_pid(again.state)
        assert second != first and _alive(second)
        assert [f["name"] for f in again.client.functions()] == ["keep"]  # nothing lost
        out = subprocess.run(["pgrep", "-f", str(again.state / "redis")], capture_output=True)
        assert len(out.stdout.split()) == 1  # exactly one server on this data directory
    finally:
        again.stop()


def test_queues_work_over_the_private_socket(private_node):
    private_node.client.deploy(
        {"name": "hi", "handler": "hearth.functions.examples.handlers:hello"}
    )
    inv = private_node.client.invoke("hi", b'{"name": "q"}', "application/json", is_async=True)
    iid = inv.json()["invocation_id"]
    for _ in range(300):
        rec = private_node.client.invocation(iid)
        if rec["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert rec["status"] == "succeeded" and rec["result"]["greeting"] == "hello, q"


def test_a_metrics_scrape_does_not_scan_the_keyspace(private_node):
    """M3: the queue figures on /metrics come from the triggers Hearth knows (its registries),
    never from a SCAN over the whole keyspace: Redis' own command counters show what a scrape
    ran. A foreign stream with a consumer group (only a SCAN would find it) stays unreported,
    while a deployed function's trigger is reported with the length it has at the scrape."""
    from hearth.queue.producer import publish_sync
    from prometheus_client.parser import text_string_to_metric_families

    url = (private_node.state / "redis-url").read_text().strip()
    r = redis.Redis.from_url(url)
    r.xadd("other-app:events", {"x": "1"})
    r.xgroup_create("other-app:events", "other-app-workers", id="0")
    for i in range(200):  # a keyspace worth scanning
        r.set(f"other-app:key:{i}", i)
    stream = f"m3-{os.getpid()}"
    private_node.client.deploy(
        {
            "name": "m3",
            "handler": "hearth.functions.examples.handlers:noop",
            "triggers": [{"type": "redis-stream", "stream": stream}],
        }
    )

    def calls() -> dict[str, int]:
        return {k: v["calls"] for k, v in r.info("commandstats").items()}

    private_node.client.request("GET", "/metrics", admin=True)  # cached for 2 s: before...
    time.sleep(2.1)  # ...this: the next scrape reads Redis
    n = 7  # published now: a scrape that reports them read Redis after this point
    for i in range(n):
        publish_sync(r, stream, {"i": i})
    before = calls()
    body = private_node.client.request("GET", "/metrics", admin=True).body
    after = calls()
    ran = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    lengths = {
        x.labels["stream"]: x.value
        for fam in text_string_to_metric_families(body.decode())
        if fam.name == "hearth_queue_length"
        for x in fam.samples
    }
    assert lengths.get(stream) == n, lengths  # fresh figures, from the registries
    assert not {"cmdstat_scan", "cmdstat_keys"} & set(ran), ran
    assert "other-app:events" not in lengths and b"other-app-workers" not in body


STARTER = """
import signal, sys, time
from pathlib import Path
from hearth.localnode import start_node
from hearth.redis_server import RedisServer
d = Path(sys.argv[1])
srv = RedisServer(d / "redis").start()  # as the test suite and the benchmarks start theirs
node = start_node(d / "node", redis_url=None, dataplane="unix")
node_redis = int((d / "node" / "redis" / "redis.pid").read_text())
print(srv.proc.pid, node.proc.pid, node_redis, flush=True)
try:
    time.sleep(120)
finally:  # what SIGINT runs; SIGTERM and SIGKILL never get here
    node.stop()
    srv.stop()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_script_leaves_no_redis_server_or_node(tmp_path, sig):
    """Stray redis-servers on the shared machine: a benchmark or test run stopped with SIGTERM
    or SIGKILL ran no teardown, and its redis-server (its own session) and `hearth up` (with
    the node's private redis-server and proxy daemon) ran on. Each dies with its starter now."""
    import sys

    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(x) for x in starter.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids), pids
        starter.send_signal(sig)
        starter.wait(10)
        for _ in range(400):  # up to 20 s; `hearth up` stops everything within a few
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.05)
        left = [p for p in pids if _alive(p)]
        assert not left, f"left running after {sig.name}: {left}"
    finally:
        if starter.poll() is None:
            starter.kill()
        for p in pids if "pids" in locals() else []:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_server_started_from_a_thread_that_ends_keeps_running(tmp_path):
    """The death signal follows the *thread* that forked the child: a server started from a
    worker thread (a test's `asyncio.to_thread`) must not be stopped when that thread ends."""
    import threading

    from hearth.redis_server import RedisServer

    srv = RedisServer(tmp_path / "redis")
    t = threading.Thread(target=srv.start)
    t.start()
    t.join()
    try:
        time.sleep(0.5)  # a SIGTERM at the thread's end would have stopped it by now
        assert srv.proc is not None and srv.proc.poll() is None, "stopped with its thread"
    finally:
        srv.stop()
