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
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hearth.dataplane import control
from hearth.dataplane.descriptor import MAX_ID, SIZE, Descriptor, Status

log = logging.getLogger("hearth.proxies")

MODES = ("auto", "ebpf", "unix")
#: per-destination queue limit in the daemon (unix mode): beyond it the sender gets QUEUE_FULL
MAX_QUEUED = 65536
_DST = struct.Struct("<I")
_LEN_AT_16 = struct.Struct("<Q")
_SRC = struct.Struct("<I")  # bytes 4..7 of a descriptor


@dataclass
class _Ctrl:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    endpoint_id: int | None = None
    pid: int = 0


@dataclass
class _Peer:
    """The daemon's end of an endpoint's data socket."""

    endpoint_id: int
    sock: socket.socket
    ctrl: _Ctrl
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    msgs: int = 0  # routed to this endpoint by the daemon
    bytes: int = 0


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
        self._peers: dict[int, _Peer] = {}
        self._ctrls: dict[int, _Ctrl] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._unrouted = 0  # unix mode (eBPF mode reads the BPF counter)
        self._relayed = 0  # eBPF mode: descriptors the daemon had to relay itself (races)
        self._per_dst: dict[int, list[int]] = {}  # unix mode counters, kept after leave
        self.started_at = time.time()
        #: exit when this process is gone (a node agent that dies must not leak its daemon)
        self.parent_pid = parent_pid
        self._sock_ino: int | None = None

    # -- start / stop ----------------------------------------------------------------------
    def _choose_mode(self) -> None:
        from hearth.proxies import ebpf

        if self.requested_mode == "unix":
            self.mode, self.reason = "unix", "forced by configuration"
            return
        why = ebpf.ebpf_unavailable_reason()
        if why is None:
            try:
                self.router = ebpf.SockmapRouter(self.max_endpoints)
                self.mode = "ebpf"
                self.reason = (
                    "forced by configuration"
                    if self.requested_mode == "ebpf"
                    else "auto: root and bcc loaded sk_msg.c"
                )
                return
            except Exception as e:  # bcc raises plain Exception on compile/load failure
                why = f"loading sk_msg.c failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        if self.requested_mode == "ebpf":
            raise RuntimeError(f"eBPF mode requested but unavailable: {why}")
        self.mode, self.reason = "unix", f"auto: {why}"

    def _bind(self) -> None:
        path = self.socket_path
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
            elif _orphaned_daemon(hello):
                # its node agent was killed and it has not noticed yet (it checks once a
                # second): the restarted node takes the path; the old daemon then stops by
                # itself and does not remove our socket (see _release_path)
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
        self._listener = s
        self._sock_ino = os.stat(path).st_ino

    def start(self) -> ProxyDaemon:
        """Choose the mode, load eBPF if used, bind the control socket."""
        self._choose_mode()
        try:
            self._bind()
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
                            self._accept()
                        elif kind == "wake":
                            self._wake_r.recv(64)
                        elif kind == "ctrl":
                            self._on_ctrl(obj)
                        elif kind == "peer":
                            if events & selectors.EVENT_READ:
                                self._on_peer_read(obj)
                            if events & selectors.EVENT_WRITE and obj.endpoint_id in self._peers:
                                self._flush(obj)
                    except Exception:  # one bad client must not take the node down
                        log.exception("error handling %s", kind)
                        if kind == "ctrl":
                            self._drop_ctrl(obj)
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
        try:
            if os.stat(self.socket_path).st_ino != self._sock_ino:
                raise FileNotFoundError
        except FileNotFoundError:
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
        for c in list(self._ctrls.values()):
            self._drop_ctrl(c)
        if self._listener is not None:
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
            self._listener = None
            self._release_path()
        if self.router is not None:
            self.router.close()
            self.router = None
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        log.info("hearth proxy daemon on %s stopped", self.socket_path)

    def _release_path(self) -> None:
        """Remove our socket file, unless it is no longer ours: replaced (another inode), or
        taken over by a restarted node's daemon that got our inode number back (a freed inode
        is often reused at once), which then answers on the path while ours is closed."""
        try:
            if self._sock_ino is None or os.stat(self.socket_path).st_ino != self._sock_ino:
                return
            if control.probe(self.socket_path, timeout=1.0) is not None:
                return
        except FileNotFoundError:
            return
        except OSError:  # something else answers there
            return
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # -- control connections ---------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                s, _ = self._listener.accept()
            except BlockingIOError:
                return
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                log.warning("refused control connection from uid %d", uid)
                s.close()
                continue
            c = _Ctrl(s)
            try:
                control.send_msg(
                    s,
                    {
                        "hello": "hearth-proxy",
                        "mode": self.mode,
                        "version": control.PROTOCOL_VERSION,
                        "pid": os.getpid(),
                        "parent_pid": self.parent_pid,
                    },
                )
            except OSError:
                s.close()
                continue
            s.setblocking(False)
            self._ctrls[s.fileno()] = c
            self._sel.register(s, selectors.EVENT_READ, ("ctrl", c))

    def _on_ctrl(self, c: _Ctrl) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(c.sock, 65536, 4)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        c.fds.extend(fds)
        if not data:
            self._drop_ctrl(c)
            return
        c.inbuf += data
        try:
            frames = control.split_frames(c.inbuf)
        except control.ProtocolError as e:
            log.warning("bad control frame: %s", e)
            self._drop_ctrl(c)
            return
        for msg in frames:
            fds, c.fds = c.fds, []
            try:
                reply = self._handle(c, msg, fds)
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            c.sock.setblocking(True)
            try:
                control.send_msg(c.sock, reply)
            except OSError:
                self._drop_ctrl(c)
                return
            finally:
                if c.sock.fileno() >= 0:
                    c.sock.setblocking(False)

    def _handle(self, c: _Ctrl, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "mode":
            return {"ok": True, "mode": self.mode, "reason": self.reason}
        if op == "stats":
            return {"ok": True, **self.stats()}
        if op == "register":
            return self._register(c, msg, fds)
        return {"ok": False, "error": f"unknown op {op!r} (expected register, stats or mode)"}

    def _register(self, c: _Ctrl, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        eid = msg.get("id")
        if not isinstance(eid, int) or isinstance(eid, bool) or not 0 <= eid < MAX_ID:
            return {
                "ok": False,
                "error": f"id: endpoint id must be an integer in [0, {MAX_ID}), got {eid!r}",
            }
        pid = msg.get("pid") or 0
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
            # checked before anything changes: a bad field must not leave a route or an fd behind
            return {"ok": False, "error": f"pid: must be a non-negative integer, got {pid!r}"}
        if c.endpoint_id is not None:
            return {
                "ok": False,
                "error": f"this connection already registered endpoint {c.endpoint_id}",
            }
        if eid in self._peers:
            return {"ok": False, "error": f"endpoint id {eid} is already registered"}
        want = 2 if self.mode == "ebpf" else 1
        if len(fds) != want:
            return {
                "ok": False,
                "error": f"register in {self.mode} mode needs {want} socket fd(s), got {len(fds)}",
            }
        try:
            if self.mode == "ebpf":
                data = socket.socket(fileno=os.dup(fds[0]))
                try:
                    if (
                        data.family not in (socket.AF_INET, socket.AF_INET6)
                        or data.type != socket.SOCK_STREAM
                    ):
                        raise ValueError("eBPF mode needs a connected TCP data socket")
                    self.router.insert(eid, data.fileno())
                finally:
                    data.close()  # the SOCKHASH holds the socket now, not our fd
                peer_fd = fds[1]
            else:
                peer_fd = fds[0]
            peer_sock = socket.socket(fileno=os.dup(peer_fd))
        except (OSError, ValueError) as e:
            if self.mode == "ebpf":
                self.router.remove(eid)
            return {"ok": False, "error": f"cannot register endpoint {eid}: {e}"}
        peer_sock.setblocking(False)
        p = _Peer(eid, peer_sock, c)
        c.endpoint_id = eid
        c.pid = pid
        self._peers[eid] = p
        self._sel.register(peer_sock, selectors.EVENT_READ, ("peer", p))
        log.info("endpoint %d registered (pid %d, %s)", eid, c.pid, self.mode)
        return {"ok": True, "mode": self.mode, "id": eid}

    def _drop_ctrl(self, c: _Ctrl) -> None:
        for fd in c.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        c.fds = []
        fileno = c.sock.fileno()
        if fileno >= 0:
            self._ctrls.pop(fileno, None)
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()
        eid = c.endpoint_id
        if eid is not None and self._peers.get(eid) is not None and self._peers[eid].ctrl is c:
            p = self._peers.pop(eid)
            if self.router is not None:
                self.router.remove(eid)
            try:
                self._sel.unregister(p.sock)
            except (KeyError, ValueError):
                pass
            p.sock.close()
            log.info("endpoint %d left; route deleted", eid)

    # -- data path (unix mode relay; eBPF mode: unroutable descriptors only) --------------
    def _on_peer_read(self, p: _Peer) -> None:
        try:
            data = p.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # the endpoint closed its data socket; the control connection decides the rest
            try:
                self._sel.unregister(p.sock)
            except (KeyError, ValueError):
                pass
            return
        p.inbuf += data
        n = len(p.inbuf) // SIZE
        if not n:
            return
        frames = bytes(p.inbuf[: n * SIZE])
        del p.inbuf[: n * SIZE]
        for i in range(0, len(frames), SIZE):
            self._route(p, frames[i : i + SIZE])

    def _route(self, src: _Peer, frame: bytes) -> None:
        (dst,) = _DST.unpack_from(frame, 0)
        target = self._peers.get(dst)
        if target is None:
            self._unrouted += 1
            self._reject(src, frame, Status.UNKNOWN_DST)
            return
        if len(target.outbuf) >= MAX_QUEUED * SIZE:
            self._reject(src, frame, Status.QUEUE_FULL)
            return
        (length,) = _LEN_AT_16.unpack_from(frame, 16)
        # `src` is what the receiver trusts to know who sent a descriptor: stamped here from the
        # registered connection, never taken from the sender's bytes
        frame = frame[:4] + _SRC.pack(src.endpoint_id) + frame[8:]
        if self.mode == "ebpf":
            self._relayed += 1
        else:
            cnt = self._per_dst.setdefault(dst, [0, 0])
            cnt[0] += 1
            cnt[1] += length
        self._enqueue(target, frame)

    def _reject(self, src: _Peer, frame: bytes, status: Status) -> None:
        err = Descriptor.unpack(frame).bounce(status, dst=src.endpoint_id)
        self._enqueue(src, err.pack())

    def _enqueue(self, p: _Peer, frame: bytes) -> None:
        was_empty = not p.outbuf
        p.outbuf += frame
        if was_empty:
            self._flush(p)

    def _flush(self, p: _Peer) -> None:
        try:
            while p.outbuf:
                n = p.sock.send(p.outbuf)
                del p.outbuf[:n]
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise
            p.outbuf.clear()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if p.outbuf else 0)
        try:
            self._sel.modify(p.sock, events, ("peer", p))
        except (KeyError, ValueError):
            pass

    # -- queries ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        if self.mode == "ebpf" and self.router is not None:
            per_dst = self.router.counters()
            unrouted = self.router.unrouted()
        else:
            per_dst = {k: {"msgs": v[0], "bytes": v[1]} for k, v in self._per_dst.items()}
            unrouted = self._unrouted
        return {
            "mode": self.mode,
            "reason": self.reason,
            "socket": self.socket_path,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "endpoints": sorted(self._peers),
            "per_dst": {str(k): v for k, v in sorted(per_dst.items())},
            "unrouted": unrouted,
            "daemon_relayed": self._relayed
            if self.mode == "ebpf"
            else sum(v[0] for v in self._per_dst.values()),
        }


def _orphaned_daemon(hello: dict[str, Any]) -> bool:
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
