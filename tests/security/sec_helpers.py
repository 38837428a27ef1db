"""Helpers for the security tests (imported by name: every test folder has its own conftest)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hearth.localnode import LocalNode

HERE = Path(__file__).parent
TOKEN = "security-admin-token-0123456789"


def deploy(node: LocalNode, name: str, handler: str, **extra) -> None:
    node.client.deploy(
        {"name": name, "handler": f"sec_handlers:{handler}", "code_path": str(HERE), **extra}
    )


def one_busy_admitter(max_queue_wait_s: float | None) -> tuple[Any, Any, SimpleNamespace]:
    """An `Admitter` on a real `InstanceTable` whose function `f` (concurrency 1, at most one
    instance, queue 100) has its one instance `i` busy: (admitter, function state, instance)."""
    from hearth.agent.admitter import Admitter
    from hearth.agent.table import InstanceTable
    from hearth.spec import FunctionSpec

    spec = FunctionSpec(name="f", handler="m:h", concurrency=1, max_instances=1, queue_size=100)
    table = InstanceTable()
    fs = table.ensure(spec)
    inst = SimpleNamespace(id="i", live=True, state="busy", inflight=1, last_used=0.0)
    fs.instances["i"] = inst
    adm = Admitter(table, scale_out=lambda fs: None, arrived=lambda fs, t: None)
    adm.max_queue_wait_s = max_queue_wait_s
    return adm, fs, inst


def rss(pid: int, field: str = "VmRSS") -> int:
    """A /proc/<pid>/status figure in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def free_loopback_source(i: int) -> str:
    """127.0.0.<2+i>: distinct client addresses on loopback (all reach 127.0.0.1)."""
    return f"127.0.0.{2 + i}"


def connect_from(src: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """The URL of a port that accepts no connection and refuses none: a listening socket whose
    accept queue is full of our own connections, so the kernel drops every new SYN."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    addr = lsock.getsockname()
    fillers: list[socket.socket] = []
    try:
        while True:  # until a connect no longer completes: the queue is full
            s = socket.socket()
            s.settimeout(0.5)
            fillers.append(s)
            try:
                s.connect(addr)
            except TimeoutError:
                break
            assert len(fillers) < 16, "the accept queue does not fill"
        yield f"http://127.0.0.1:{addr[1]}"
    finally:
        for s in fillers:
            s.close()
        lsock.close()
