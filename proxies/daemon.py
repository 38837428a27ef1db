"""Per-node proxy daemon: keeps the descriptor routes of every instance on the node.

``python -m hearth.proxies.daemon --socket PATH --mode auto|ebpf|unix``

* **ebpf** -- loads ``sk_msg.c`` with bcc. Instances hand over one end of a loopback TCP
  pair (SCM_RIGHTS); it goes into the SOCKHASH under the instance's endpoint id and the
  kernel redirects each descriptor socket-to-socket. The daemon only sees descriptors for
  unknown destinations (passed to the TCP peer it holds) and answers them with ERROR.
* **unix** -- fallback when eBPF cannot load: instances hand over one end of an AF_UNIX
  socketpair and the daemon relays descriptors by ``dst`` (exact 64-byte frames).

Either way, an unknown destination gets the sender an ERROR descriptor back (status
``UNKNOWN_DST``, ``src = PROXY_ID``, ``aux`` = the destination that failed, same ``corr``),
and a closed control connection removes the instance's route. The mode is chosen once at
start, logged, and reported by the ``mode`` and ``stats`` control queries.

Here: the daemon's life (mode, bind, serve loop, stop) and its queries. The parts:
``control_socket`` (the socket file: bind, takeover, release), ``ebpf`` (the bcc program and
its maps, and the mode choice), ``registry`` (control connections, endpoint registration),
``relay`` (descriptors the daemon relays itself).
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any

from hearth.dataplane import control

from . import control_socket
from .registry import Ctrl, Registry
from .relay import MAX_QUEUED, Relay

__all__ = ["MAX_QUEUED", "MODES", "ProxyDaemon", "main"]

log = logging.getLogger("hearth.proxies")

MODES = ("auto", "ebpf", "unix")


class ProxyDaemon:
    def __init__(
        self,
        socket_path: str,
        mode: str = "auto",
        *,
        max_endpoints: int = 65536,
        parent_pid: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if len(os.fsencode(socket_path)) >= 108:
            raise ValueError(f"socket path too long for AF_UNIX (max 107 bytes): {socket_path}")
        self.socket_path = socket_path
        self.requested_mode = mode
        self.max_endpoints = max_endpoints
        self.mode: str | None = None
        self.reason = ""
        self.router = None
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self.relay = Relay(self._sel)
        self.registry = Registry(self._sel, self.relay, self._answer)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.started_at = time.time()
        #: exit when this process is gone (a node agent that dies must not leak its daemon)
        self.parent_pid = parent_pid
        self._sock_ino: int | None = None

    # -- start / stop ----------------------------------------------------------------------
    def _choose_mode(self) -> None:
        from hearth.proxies import ebpf

        self.mode, self.reason, self.router = ebpf.choose_mode(
            self.requested_mode, self.max_endpoints
        )
        self.relay.mode = self.registry.mode = self.mode
        self.registry.router = self.router

    def start(self) -> ProxyDaemon:
        """Choose the mode, load eBPF if used, bind the control socket."""
        self._choose_mode()
        try:
            self._listener, self._sock_ino = control_socket.bind(self.socket_path)
        except BaseException:
            if self.router is not None:
                self.router.close()
            raise
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        log.info(
            "hearth proxy daemon on %s: mode=%s (%s)", self.socket_path, self.mode, self.reason
        )
        return self

    def serve_forever(self) -> None:
        if self._listener is None:
            self.start()
        self._started.set()
        try:
            next_check = 0.0
            while not self._stopping:
                now = time.monotonic()
                if now >= next_check:  # at most once a second, off the hot path
                    next_check = now + 1.0
                    if self._orphaned():
                        break
                for key, events in self._sel.select(timeout=1.0):
                    kind, obj = key.data
                    try:
                        if kind == "listen":
                            self.registry.accept(self._listener, self._hello())
                        elif kind == "wake":
                            self._wake_r.recv(64)
                        elif kind == "ctrl":
                            self.registry.on_readable(obj)
                        elif kind == "peer":
                            if events & selectors.EVENT_READ:
                                self.relay.on_read(obj)
                            if (
                                events & selectors.EVENT_WRITE
                                and obj.endpoint_id in self.relay.peers
                            ):
                                self.relay.flush(obj)
                    except Exception:  # one bad client must not take the node down
                        log.exception("error handling %s", kind)
                        if kind == "ctrl":
                            self.registry.drop(obj)
        finally:
            self._shutdown()

    def _orphaned(self) -> bool:
        """True if nobody can reach us any more: parent gone, or our socket file removed."""
        if self.parent_pid is not None:
            try:
                os.kill(self.parent_pid, 0)
            except ProcessLookupError:
                log.warning("parent pid %d is gone; stopping", self.parent_pid)
                return True
            except PermissionError:
                pass
        if not control_socket.is_ours(self.socket_path, self._sock_ino):
            log.warning("control socket %s was removed or replaced; stopping", self.socket_path)
            self._sock_ino = None  # not ours: don't unlink it on the way out
            return True
        return False

    def start_in_thread(self) -> ProxyDaemon:
        """Start and serve in a daemon thread (tests, embedded node agent)."""
        self.start()
        self._thread = threading.Thread(target=self.serve_forever, name="hearth-proxy", daemon=True)
        self._thread.start()
        self._started.wait(5)
        return self

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _shutdown(self) -> None:
        self.registry.drop_all()
        if self._listener is not None:
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
            self._listener = None
            control_socket.release(self.socket_path, self._sock_ino)
        if self.router is not None:
            self.router.close()
            self.router = self.registry.router = None
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        log.info("hearth proxy daemon on %s stopped", self.socket_path)

    # -- queries ---------------------------------------------------------------------------
    def _hello(self) -> dict[str, Any]:
        return {
            "hello": "hearth-proxy",
            "mode": self.mode,
            "version": control.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "parent_pid": self.parent_pid,
        }

    def _answer(self, c: Ctrl, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "mode":
            return {"ok": True, "mode": self.mode, "reason": self.reason}
        if op == "stats":
            return {"ok": True, **self.stats()}
        if op == "register":
            return self.registry.register(c, msg, fds)
        return {"ok": False, "error": f"unknown op {op!r} (expected register, stats or mode)"}

    def stats(self) -> dict[str, Any]:
        per_dst, unrouted, relayed = self.relay.counters()
        if self.mode == "ebpf" and self.router is not None:  # the kernel counts what it routes
            per_dst = self.router.counters()
            unrouted = self.router.unrouted()
        return {
            "mode": self.mode,
            "reason": self.reason,
            "socket": self.socket_path,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "endpoints": sorted(self.relay.peers),
            "per_dst": {str(k): v for k, v in sorted(per_dst.items())},
            "unrouted": unrouted,
            "daemon_relayed": relayed,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hearth.proxies.daemon", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--socket", required=True, help="control socket path (created 0600)")
    ap.add_argument(
        "--mode",
        default=os.environ.get("HEARTH_PROXY_MODE", "auto"),
        choices=MODES,
        help="auto = ebpf if root and bcc loads the program, else unix (env HEARTH_PROXY_MODE)",
    )
    ap.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the node agent) is gone",
    )
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        d = ProxyDaemon(args.socket, args.mode, parent_pid=args.parent_pid)
        d.start()
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def _term(_sig: int, _frm: object) -> None:
        d.stop()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    print(f"hearth proxy: mode={d.mode} socket={d.socket_path} ({d.reason})", flush=True)
    d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
