"""What the tests of pods joining a node agent share (`test_pod_join`, `test_join_claims`,
`test_pidns_slots`): a real `hearth up` node with its socket directory where pods find it, a
join over that socket as a pod's runtime makes one, and processes made pid 1 of their own pid
namespace (as a pod's runtime is)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from typing import Any

import pytest
from hearth.agent.join import JOIN_SOCKET
from hearth.localnode import start_node

#: run a Python script (`-c`) as pid 1 of a new pid namespace, as a pod's runtime is
IN_OWN_PID_NS = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare (root)"
)


def join_node(tmp_path, redis_url: str, env: dict[str, str] | None = None, **kw: Any):
    """A node on the unix data plane; `.sock_dir` is its socket directory (join.sock's)."""
    sock_dir = tmp_path / "sock"
    n = start_node(
        tmp_path / "state",
        redis_url=redis_url,
        dataplane="unix",
        env={"HEARTH_NODE_SOCKET_DIR": str(sock_dir), **(env or {})},
        **kw,
    )
    n.sock_dir = sock_dir
    return n


def join_open(node, hello: dict | bytes) -> tuple[dict, socket.socket]:
    """A join from this process (`hello`: the JSON line, or its raw bytes): the agent's first
    reply line, and the connection, left open (an admitted pod's life line)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(node.sock_dir / JOIN_SOCKET))
    try:
        s.sendall(hello if isinstance(hello, bytes) else json.dumps(hello).encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused at once (join_limit) and closed: its reply is here to read
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        line += chunk
    return json.loads(line.split(b"\n")[0]), s


def join_once(node, hello: dict | bytes) -> dict:
    """`join_open`, the connection closed: the agent's reply."""
    reply, s = join_open(node, hello)
    s.close()
    return reply
