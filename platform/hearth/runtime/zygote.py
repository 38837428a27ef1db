"""The per-node zygote: a fork server that has the runtime and declared common dependencies
imported once, and forks a specialised instance on demand (SOCK's zygotes, ATC'18).

Started by the node agent as ``python -m hearth.runtime.zygote FD PRELOAD [CODE_PATH]`` (PRELOAD:
comma-separated ``module`` or ``module:callable``, the callable run once after the import, on top
of the lean runtime itself; CODE_PATH goes first on ``sys.path``, for a spec's own modules) with
an allow-listed environment (never the agent's own), FD being its end of a SOCK_SEQPACKET
control socket. Messages are JSON:

    agent → zygote  {"op": "fork", "id", "deadline", "boot", "env", "log"}  [+ 2 descriptors]
    zygote → agent  {"op": "ready", "pid", "preloaded", "failed"}   once, after the imports
                    {"op": "forked", "id", "pid"} | {"op": "error", "id", "error"}
                    {"op": "exit", "pid", "rc"}                      each child it reaped

A fork request may carry (SCM_RIGHTS) the control and data sockets of an endpoint the agent
registered with the proxy ahead of time: the child keeps exactly those two (their numbers go in
``boot["endpoint_fds"]``) and skips the registration round trip; the zygote closes its copies.
A request read after its ``deadline`` (time.monotonic(): the agent has given up on it, the
zygote was stopped or stuck) is refused with an error, and no child is forked.

Fork safety. The zygote is single-threaded when it forks (BLAS/OpenMP pools are held to one
thread by its environment, and checked), holds no data-plane socket or pool mapping (each child
attaches its own), and freezes the GC so children share its pages. Each child, before any
function code runs: dies with the zygote (PR_SET_PDEATHSIG, and the zygote with the agent), gets
its own session, stdio on its own log, every other inherited descriptor closed, exactly the
environment the agent sent, fresh random state, and default signal handlers.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from hearth.runtime import env as _env
from hearth.runtime import loading

# Kept to one thread in the zygote so a fork never copies a half-held pool lock.
FORK_SAFE_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# the runtime alone: numpy and the like come with a spec's ``preload`` (or the node's); the
# runtime's handler threads load concurrent.futures when first needed, a fork has it already
BASE_PRELOAD = ("hearth.runtime.instance", "msgpack", "concurrent.futures")
MAX_MSG = 1 << 20
PR_SET_PDEATHSIG = 1


def instance_env(spec_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the zygote and of each child it forks: hearth.runtime.env's
    allow-list (never the agent's own variables, tokens and Redis URL included), the spec's
    ``env``, and the fork-safety settings."""
    out = _env.instance_env(spec_env)
    out.update(FORK_SAFE_ENV)
    return out


_libc: ctypes.CDLL | None = None


def pdeathsig() -> None:
    """Die (SIGKILL) when the parent does, so nothing outlives the agent."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def close_inherited(keep: int = 3, also: frozenset[int] = frozenset()) -> None:
    """Close every descriptor from `keep` up but those in `also` (only those open: closing a
    million possible descriptors one by one takes tens of milliseconds)."""
    try:
        fds = [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(keep, 1 << 16)
    for fd in fds:
        if fd >= keep and fd not in also:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


class Zygote:
    def __init__(self, ctrl: socket.socket, preload: list[str]) -> None:
        self.ctrl = ctrl
        self.preload = preload
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def send(self, msg: dict[str, Any]) -> None:
        self.ctrl.send(json.dumps(msg).encode())

    def load(self) -> None:
        loaded, failed = [], {}
        for entry in self.preload:
            mod, _, warm = entry.partition(":")
            try:
                m = importlib.import_module(mod)
                if warm:  # e.g. load compiled kernels once here, not in every instance
                    getattr(m, warm)()
                loaded.append(entry)
            except Exception as e:  # the instance will fail its own import, with its own error
                failed[entry] = f"{type(e).__name__}: {e}"
        pdeathsig()  # loads libc once here, not in every child
        gc.collect()
        gc.freeze()  # children share these pages: the collector never writes to them
        self.send({"op": "ready", "pid": os.getpid(), "preloaded": loaded, "failed": failed})

    def serve(self) -> int:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        while True:
            try:
                r, _, _ = select.select([self.ctrl, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in r:
                os.read(self.wake_r, 4096)
            self.reap()
            if self.ctrl in r:
                try:
                    raw, fds, _flags, _addr = socket.recv_fds(self.ctrl, MAX_MSG, 2)
                except OSError:
                    raw, fds = b"", []
                if not raw:  # the agent has gone: so do we (and, by pdeathsig, the children)
                    return 0
                try:
                    self.handle(json.loads(raw), fds)
                finally:
                    for fd in fds:  # the child has its own copies
                        os.close(fd)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.send({"op": "exit", "pid": pid, "rc": os.waitstatus_to_exitcode(status)})

    def handle(self, req: dict[str, Any], fds: list[int]) -> None:
        if req.get("op") != "fork":
            self.send(
                {"op": "error", "id": req.get("id"), "error": f"unknown op {req.get('op')!r}"}
            )
            return
        deadline = req.get("deadline")
        if isinstance(deadline, (int, float)) and time.monotonic() > deadline:
            # the agent gave up on this fork (we were stopped or stuck): its start went on
            # without us, a child now would only be killed
            self.send({"op": "error", "id": req["id"], "error": "fork request past its deadline"})
            return
        threads = native_threads()
        if threads != 1:  # never fork with another thread that may hold a lock
            self.send({"op": "error", "id": req["id"], "error": f"zygote has {threads} threads"})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        if len(fds) == 2:
            req["boot"]["endpoint_fds"] = fds
        pid = os.fork()
        if pid == 0:
            self.child(req, parent, frozenset(fds if len(fds) == 2 else ()))  # never returns
        self.send({"op": "forked", "id": req["id"], "pid": pid})

    def child(self, req: dict[str, Any], parent: int, endpoint_fds: frozenset[int]) -> None:
        started = time.time()
        rc = 1
        try:
            pdeathsig()
            if os.getppid() != parent:  # the zygote died before the line above
                os._exit(1)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            log = req.get("log")
            out = (
                os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                if log
                else os.open(os.devnull, os.O_WRONLY)
            )
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            # control socket, wake pipe, anything a preload opened; not the endpoint's sockets
            close_inherited(3, endpoint_fds)
            os.environ.clear()
            os.environ.update(req["env"])
            rnd = sys.modules.get("numpy.random")
            if rnd is not None:
                rnd.seed()  # not the zygote's (shared) global random state
            from hearth.runtime.instance import run_instance

            rc = run_instance(req["boot"], started)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc)


def main() -> int:
    fd = int(sys.argv[1])
    preload = [m for m in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if m]
    if len(sys.argv) > 3 and sys.argv[3] and sys.argv[3] not in sys.path:
        sys.path.insert(0, sys.argv[3])
    ctrl = socket.socket(fileno=fd)
    loading.install()  # before the preloads: their modules, and every fork's, load with it
    z = Zygote(ctrl, [*BASE_PRELOAD, *(m for m in preload if m not in BASE_PRELOAD)])
    z.load()
    return z.serve()


if __name__ == "__main__":
    sys.exit(main())
