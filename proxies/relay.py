"""The daemon's data path: descriptors it relays itself, by ``dst``, between registered peers.

Unix mode relays every descriptor; eBPF mode only those the kernel passed up (unknown
destinations, races with a registration). An unknown destination, or one whose queue holds
``MAX_QUEUED`` descriptors, gets the sender an ERROR descriptor back. ``src`` is stamped from the
registered connection, never taken from the sender's bytes."""

from __future__ import annotations

import errno
import selectors
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hearth.dataplane.descriptor import SIZE, Descriptor, Status

#: per-destination queue limit in the daemon (unix mode): beyond it the sender gets QUEUE_FULL
MAX_QUEUED = 65536
if TYPE_CHECKING:
    from .registry import Ctrl

_DST = struct.Struct("<I")
_LEN_AT_16 = struct.Struct("<Q")
_SRC = struct.Struct("<I")  # bytes 4..7 of a descriptor


@dataclass
class Peer:
    """The daemon's end of an endpoint's data socket."""

    endpoint_id: int
    sock: socket.socket
    ctrl: Ctrl  # the control connection that registered it
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    msgs: int = 0  # routed to this endpoint by the daemon
    bytes: int = 0


class Relay:
    """The registered peers (by endpoint id) and the descriptors relayed between them."""

    def __init__(self, sel: selectors.BaseSelector):
        self.sel = sel
        self.mode: str | None = None  # set by the daemon once it has chosen
        self.peers: dict[int, Peer] = {}
        self.unrouted = 0  # unix mode (eBPF mode reads the BPF counter)
        self.relayed = 0  # eBPF mode: descriptors the daemon had to relay itself (races)
        self.per_dst: dict[int, list[int]] = {}  # unix mode counters, kept after leave

    def add(self, p: Peer) -> None:
        self.peers[p.endpoint_id] = p
        self.sel.register(p.sock, selectors.EVENT_READ, ("peer", p))

    def remove(self, eid: int) -> None:
        p = self.peers.pop(eid)
        try:
            self.sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        p.sock.close()

    def on_read(self, p: Peer) -> None:
        try:
            data = p.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # the endpoint closed its data socket; the control connection decides the rest
            try:
                self.sel.unregister(p.sock)
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
            self.route(p, frames[i : i + SIZE])

    def route(self, src: Peer, frame: bytes) -> None:
        (dst,) = _DST.unpack_from(frame, 0)
        target = self.peers.get(dst)
        if target is None:
            self.unrouted += 1
            self.reject(src, frame, Status.UNKNOWN_DST)
            return
        if len(target.outbuf) >= MAX_QUEUED * SIZE:
            self.reject(src, frame, Status.QUEUE_FULL)
            return
        (length,) = _LEN_AT_16.unpack_from(frame, 16)
        # `src` is what the receiver trusts to know who sent a descriptor: stamped here from the
        # registered connection, never taken from the sender's bytes
        frame = frame[:4] + _SRC.pack(src.endpoint_id) + frame[8:]
        if self.mode == "ebpf":
            self.relayed += 1
        else:
            cnt = self.per_dst.setdefault(dst, [0, 0])
            cnt[0] += 1
            cnt[1] += length
        self.enqueue(target, frame)

    def reject(self, src: Peer, frame: bytes, status: Status) -> None:
        err = Descriptor.unpack(frame).bounce(status, dst=src.endpoint_id)
        self.enqueue(src, err.pack())

    def enqueue(self, p: Peer, frame: bytes) -> None:
        was_empty = not p.outbuf
        p.outbuf += frame
        if was_empty:
            self.flush(p)

    def flush(self, p: Peer) -> None:
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
            self.sel.modify(p.sock, events, ("peer", p))
        except (KeyError, ValueError):
            pass

    def counters(self) -> tuple[dict[int, dict[str, int]], int, int]:
        """Per destination {msgs, bytes} and unrouted (as counted here: unix mode), and the
        descriptors this daemon relayed."""
        per_dst = {k: {"msgs": v[0], "bytes": v[1]} for k, v in self.per_dst.items()}
        relayed = self.relayed if self.mode == "ebpf" else sum(v[0] for v in self.per_dst.values())
        return per_dst, self.unrouted, relayed
