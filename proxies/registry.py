"""The daemon's control connections: greeting each client, reading its requests, and
registering an endpoint's sockets (into the SOCKHASH in eBPF mode, and with the relay).

A closed control connection removes its endpoint's route. Requests are answered by the
daemon's ``answer`` callback (``register`` comes back here: ``Registry.register``)."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hearth.dataplane import control
from hearth.dataplane.descriptor import MAX_ID

from .relay import Peer, Relay

log = logging.getLogger("hearth.proxies")


@dataclass
class Ctrl:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    endpoint_id: int | None = None
    pid: int = 0


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Registry:
    """Control connections by fd, and the endpoints they registered."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        relay: Relay,
        answer: Callable[[Ctrl, dict[str, Any], list[int]], dict[str, Any]],
    ):
        self.sel = sel
        self.relay = relay
        self.answer = answer
        self.ctrls: dict[int, Ctrl] = {}
        self.mode: str | None = None  # set by the daemon once it has chosen
        self.router = None  # the SOCKHASH router in eBPF mode

    def accept(self, listener: socket.socket, hello: dict[str, Any]) -> None:
        """Every pending connection from root or our own uid, greeted with ``hello``."""
        while True:
            try:
                s, _ = listener.accept()
            except BlockingIOError:
                return
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                log.warning("refused control connection from uid %d", uid)
                s.close()
                continue
            c = Ctrl(s)
            try:
                control.send_msg(s, hello)
            except OSError:
                s.close()
                continue
            s.setblocking(False)
            self.ctrls[s.fileno()] = c
            self.sel.register(s, selectors.EVENT_READ, ("ctrl", c))

    def on_readable(self, c: Ctrl) -> None:
        """Read what ``c`` sent (bytes and passed fds); answer each whole request in order."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(c.sock, 65536, 4)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        c.fds.extend(fds)
        if not data:
            self.drop(c)
            return
        c.inbuf += data
        try:
            frames = control.split_frames(c.inbuf)
        except control.ProtocolError as e:
            log.warning("bad control frame: %s", e)
            self.drop(c)
            return
        for msg in frames:
            fds, c.fds = c.fds, []
            try:
                reply = self.answer(c, msg, fds)
            finally:
                _close_fds(fds)
            c.sock.setblocking(True)
            try:
                control.send_msg(c.sock, reply)
            except OSError:
                self.drop(c)
                return
            finally:
                if c.sock.fileno() >= 0:
                    c.sock.setblocking(False)

    def register(self, c: Ctrl, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
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
        if eid in self.relay.peers:
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
        c.endpoint_id = eid
        c.pid = pid
        self.relay.add(Peer(eid, peer_sock, c))
        log.info("endpoint %d registered (pid %d, %s)", eid, c.pid, self.mode)
        return {"ok": True, "mode": self.mode, "id": eid}

    def drop(self, c: Ctrl) -> None:
        """Close ``c`` and any fds it passed; its endpoint's route goes with it."""
        _close_fds(c.fds)
        c.fds = []
        fileno = c.sock.fileno()
        if fileno >= 0:
            self.ctrls.pop(fileno, None)
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()
        eid = c.endpoint_id
        peers = self.relay.peers
        if eid is not None and peers.get(eid) is not None and peers[eid].ctrl is c:
            if self.router is not None:
                self.router.remove(eid)
            self.relay.remove(eid)
            log.info("endpoint %d left; route deleted", eid)

    def drop_all(self) -> None:
        for c in list(self.ctrls.values()):
            self.drop(c)
