"""A node agent that restarts on the same port finds its proxy socket path taken: by a stale file
(everything was killed, as `podman kill` does to a container) or by the old daemon, which
outlives a kill -9 of its agent for up to a second. The new daemon must serve, and the old one
must never remove the new one's socket on its way out."""

from __future__ import annotations

import os
import subprocess

import pytest
from hearth.dataplane import control
from hearth.dataplane.descriptor import Descriptor
from hearth.dataplane.endpoint import Endpoint
from hearth.proxies import control_socket
from hearth.proxies.daemon import ProxyDaemon


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_orphaned_daemon_only_when_its_agent_is_gone_in_our_pid_namespace():
    me, dead = os.getpid(), _dead_pid()
    hello = {"pid": me, "peer_pid": me}
    assert control_socket.orphaned_daemon(hello | {"parent_pid": dead})
    assert not control_socket.orphaned_daemon(hello | {"parent_pid": os.getppid()})  # alive
    # pids from another namespace (the kernel's peer pid differs) or missing mean nothing here
    assert not control_socket.orphaned_daemon({"pid": me, "peer_pid": 1, "parent_pid": dead})
    assert not control_socket.orphaned_daemon({"pid": me, "peer_pid": me, "parent_pid": None})
    assert not control_socket.orphaned_daemon({"pid": 0, "peer_pid": 0, "parent_pid": dead})


def test_hello_names_the_daemon_and_its_node_agent(sockdir):
    path = os.path.join(sockdir, "p.sock")
    parent = os.getppid()
    d = ProxyDaemon(path, "unix", parent_pid=parent).start_in_thread()
    try:
        hello = control.probe(path)
        assert hello is not None
        assert (hello["pid"], hello["parent_pid"], hello["peer_pid"]) == (
            os.getpid(),
            parent,
            os.getpid(),
        )
    finally:
        d.stop()
    assert control.probe(path) is None  # nobody serves: missing file


def test_probe_of_a_stale_socket_file_is_none(sockdir):
    import socket

    path = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays, nobody listens: what a killed daemon leaves
    assert os.path.exists(path) and control.probe(path) is None


def test_new_daemon_takes_over_from_an_orphaned_one(sockdir, monkeypatch):
    path = os.path.join(sockdir, "p.sock")
    old = ProxyDaemon(path, "unix", parent_pid=_dead_pid())
    # its node agent was killed and the old daemon has not noticed yet (it checks once a second)
    monkeypatch.setattr(old, "_orphaned", lambda: False)
    old.start_in_thread()
    new = ProxyDaemon(path, "unix").start_in_thread()  # before the fix: "already serving"
    try:
        with Endpoint.register(path, 1) as a, Endpoint.register(path, 2) as b:
            a.send(Descriptor(dst=2, src=1, aux=7))
            assert b.recv(timeout=10).aux == 7
            assert new.stats()["endpoints"] == [1, 2] and old.stats()["endpoints"] == []
            old.stop()  # its exit must leave the new daemon's socket alone (inode reuse or not)
            assert os.path.exists(path)
            assert control.request(path, {"op": "stats"})["endpoints"] == [1, 2]
    finally:
        old.stop()
        new.stop()
    assert not os.path.exists(path)  # the new daemon still removes its own socket


def test_daemon_of_a_live_node_agent_is_not_taken_over(sockdir):
    path = os.path.join(sockdir, "p.sock")
    old = ProxyDaemon(path, "unix", parent_pid=os.getpid()).start_in_thread()
    try:
        with pytest.raises(RuntimeError, match="already serving"):
            ProxyDaemon(path, "unix").start()
        assert control.request(path, {"op": "mode"})["ok"]
    finally:
        old.stop()


def test_takeover_when_the_old_daemon_removes_its_socket_first(sockdir, monkeypatch):
    """The old daemon notices its node agent is gone (once a second) and removes its socket on
    its way out: that can happen between the new daemon's probe and its unlink (CI rehearsal
    13: FileNotFoundError, and the restarted node exited with code 1). The new one serves."""
    import hearth.proxies.daemon as daemon_mod

    path = os.path.join(sockdir, "p.sock")
    old = ProxyDaemon(path, "unix", parent_pid=_dead_pid())
    monkeypatch.setattr(old, "_orphaned", lambda: False)
    old.start_in_thread()
    real_probe = control.probe

    def probe_then_old_leaves(p: str):
        hello = real_probe(p)
        os.unlink(p)  # the old daemon's own clean-up, just after it greeted us
        return hello

    monkeypatch.setattr(daemon_mod.control, "probe", probe_then_old_leaves)
    try:
        new = ProxyDaemon(path, "unix").start_in_thread()
    finally:
        monkeypatch.setattr(daemon_mod.control, "probe", real_probe)
    try:
        with Endpoint.register(path, 1) as a, Endpoint.register(path, 2) as b:
            a.send(Descriptor(dst=2, src=1, aux=9))
            assert b.recv(timeout=5).aux == 9
    finally:
        new.stop()
        old.stop()
