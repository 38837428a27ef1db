"""The proxy daemon's control socket file: binding it (past a stale file, or taking it over
from an orphaned daemon), checking it is still ours, and removing it only while it is.

A node agent that restarts on the same port finds the path taken: by a stale file (everything
was killed) or by the old daemon, which outlives a kill -9 of its agent for up to a second."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from hearth.dataplane import control

log = logging.getLogger("hearth.proxies")


def bind(path: str) -> tuple[socket.socket, int]:
    """Listen on ``path`` (created 0600, non-blocking); the listener and the file's inode.
    Raises RuntimeError if a live daemon serves the path."""
    if os.path.lexists(path):
        try:
            hello = control.probe(path)
        except OSError:  # something accepts but does not greet: leave it alone
            hello = {}
        # either unlink may find the path gone: the old daemon, stopping on its own, removes
        # its socket between our probe and our unlink (CI rehearsal 13: FileNotFoundError,
        # the restarted node exited)
        if hello is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale socket of a dead daemon (a killed node or container)
        elif orphaned_daemon(hello):
            # its node agent was killed and it has not noticed yet (it checks once a
            # second): the restarted node takes the path; the old daemon then stops by
            # itself and does not remove our socket (see release)
            log.warning(
                "taking over %s from daemon pid %d (its node agent %d is gone)",
                path,
                hello["pid"],
                hello["parent_pid"],
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise RuntimeError(f"a proxy daemon is already serving {path}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600 (no chmod race)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(128)
    s.setblocking(False)
    return s, os.stat(path).st_ino


def is_ours(path: str, ino: int | None) -> bool:
    """True while ``path`` is still the file we bound (not removed, not replaced)."""
    try:
        return os.stat(path).st_ino == ino
    except FileNotFoundError:
        return False


def release(path: str, ino: int | None) -> None:
    """Remove our socket file, unless it is no longer ours: replaced (another inode), or
    taken over by a restarted node's daemon that got our inode number back (a freed inode
    is often reused at once), which then answers on the path while ours is closed."""
    try:
        if ino is None or os.stat(path).st_ino != ino:
            return
        if control.probe(path, timeout=1.0) is not None:
            return
    except FileNotFoundError:
        return
    except OSError:  # something else answers there
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def orphaned_daemon(hello: dict[str, Any]) -> bool:
    """True if the daemon that sent `hello` serves a node agent that no longer exists. Only
    decided inside one pid namespace (the daemon's pid as the kernel reports it from here
    equals the pid it announces); elsewhere its pids mean nothing here."""
    pid, parent = hello.get("pid"), hello.get("parent_pid")
    if not isinstance(parent, int) or not pid or hello.get("peer_pid") != pid:
        return False
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
