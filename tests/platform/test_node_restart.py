"""A node killed outright and started again with the same state dir and port (what `podman kill`
+ `podman start` does to a node-agent container) comes up and serves: the proxy socket file the
dead daemon left behind must not be mistaken for the new daemon."""

from __future__ import annotations

import os
import select
import signal
import time

from hearth.dataplane import control
from hearth.localnode import start_node
from hearth_proc import TOKEN, H


def _port(node) -> int:
    return int(node.url.rsplit(":", 1)[1])


def test_node_restarts_after_everything_was_killed(tmp_path, redis_url):
    node = start_node(tmp_path, redis_url=redis_url, token=TOKEN, dataplane="unix")
    port = _port(node)
    sock = tmp_path / "run" / f"proxy-{port}.sock"
    daemon_pid = control.request(str(sock), {"op": "stats"})["pid"]
    node.client.deploy({"name": "hello", "handler": f"{H}:hello"})
    assert node.client.invoke("hello", b"{}", "application/json").status == 200
    # a container kill: the agent, its daemon and its instances die at once; files stay
    _kill_and_wait([node.proc.pid, daemon_pid])
    node.proc.wait()
    assert sock.exists() and control.probe(str(sock)) is None  # the stale socket file
    # before the fix `hearth up` exited 1 here: ConnectionRefusedError in control.connect
    again = start_node(tmp_path, redis_url=redis_url, token=TOKEN, dataplane="unix", port=port)
    try:
        assert again.dataplane == "unix"
        assert control.probe(str(sock))["parent_pid"] == again.proc.pid
        r = again.client.invoke("hello", b'{"name": "again"}', "application/json")
        assert r.status == 200 and r.json()["greeting"] == "hello, again"
    finally:
        assert again.stop() == 0


def test_node_restarts_while_the_old_daemon_still_serves(tmp_path, redis_url):
    node = start_node(tmp_path, redis_url=redis_url, token=TOKEN, dataplane="unix")
    port = _port(node)
    sock = tmp_path / "run" / f"proxy-{port}.sock"
    old_daemon = control.request(str(sock), {"op": "stats"})["pid"]
    node.proc.kill()  # kill -9 of the agent only: its daemon serves on for up to a second
    node.proc.wait()
    again = start_node(tmp_path, redis_url=redis_url, token=TOKEN, dataplane="unix", port=port)
    try:
        hello = control.probe(str(sock))
        assert hello["parent_pid"] == again.proc.pid and hello["pid"] != old_daemon
        again.client.deploy({"name": "hello", "handler": f"{H}:hello"})
        assert again.client.invoke("hello", b"{}", "application/json").status == 200
        # the old daemon exits by itself and leaves the new one's socket alone
        deadline = time.monotonic() + 10
        while _alive(old_daemon) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(old_daemon)
        assert control.probe(str(sock))["parent_pid"] == again.proc.pid
    finally:
        assert again.stop() == 0


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_and_wait(pids: list[int], timeout: float = 30.0) -> None:
    """SIGKILL each process and wait until each has exited. A kill only queues the signal: the
    daemon may still hold its listening socket (a probe then connects, and fails unanswered)
    when the kill returns, and longer on a loaded machine. A pidfd (opened before the kill:
    the pid cannot be reused meanwhile) reads ready once its process has exited, its files
    (the socket with them) closed."""
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        for fd in fds:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        waiting, deadline = set(fds), time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            assert left > 0, f"killed processes did not exit within {timeout}s"
            waiting -= set(select.select(list(waiting), [], [], left)[0])
    finally:
        for fd in fds:
            os.close(fd)
