"""Child processes that die with the process that started them.

A server a script starts (a private redis-server, a `hearth up` node of a test or benchmark)
must not outlive that script when it is killed: SIGTERM and SIGKILL run no ``finally`` and no
fixture teardown, and a child started in its own session does not get the terminal's signals
either. Seen on the shared machine as stray ``redis-server`` processes after benchmarks and
test runs were stopped."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

try:  # resolved here, in the parent: a dlopen in a forked child of a threaded process can hang
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets `sig` when its parent dies
    (SIGTERM by default: a clean stop that flushes and stops its own children).

    Linux sends it when the parent *thread* that forked the child ends, not the process: so it
    is armed only for a child started from the main thread. One started from another thread (a
    test's `asyncio.to_thread`, an executor) is not tied, or it would be stopped when that
    thread ends. A parent that died between the fork and the ``prctl`` is caught by the pid
    check."""
    parent = os.getpid()
    armed = threading.current_thread() is threading.main_thread()

    def preexec() -> None:
        if not armed or _prctl is None or _prctl(PR_SET_PDEATHSIG, sig) != 0:
            return
        if os.getppid() != parent:  # the parent is already gone: no signal will come
            os.kill(os.getpid(), sig)

    return preexec
