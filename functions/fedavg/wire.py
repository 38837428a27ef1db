"""Framing of the round endpoint (a stream socket between clients and the round server).

Every message is a 16-byte frame header ``b"HFR1", u32 kind, u64 length`` followed by
``length`` bytes. Why frames and not HTTP: the server learns an update's size before the first
data byte, takes a receive slot of that size and reads the socket straight into it; the reply
is one header plus the model, sent from its slot with ``sendfile``.

client -> server                               server -> client
  HELLO   msgpack {client, token, shm?}          WELCOME msgpack {clients, round, model, pool?}
  UPDATE  a packed update (pack.py layout)       MODEL   a packed model (after every round)
  ACK     msgpack {round}: model received        ERROR   JSON {error, detail}
  BYE     (empty)

A client on the server's node (same user: it can open the 0600 pool file) may ask for the
shared-memory path: SLOT_REQUEST {length, round} -> SLOT_GRANT {slot, gen, progress}; the
client writes the packed update into that slot (the one copy of its bytes), saying
SLOT_PROGRESS {upto} every ``progress`` bytes if the grant asked for it (the server checks each
written range while it is still in cache), and sends UPDATE_IN_SLOT {slot, gen, length}; the
model comes as MODEL_IN_SLOT {slot, gen, offset, length, round}, which the client copies out
before its ACK, or reads in place: then its ACK says ``holds`` and a RELEASE {round} (sent
before its next update, or on leaving) tells the server it no longer reads that slot.

The packed update is sent without building it: :func:`update_iov` gives the header bytes and
the caller's arrays (views) with the alignment padding between them, for ``sendmsg``.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from hearth.functions.fedavg.pack import MAGIC as PACK_MAGIC
from hearth.functions.fedavg.pack import (
    PREFIX,
    VERSION,
    Header,
    LayerSpec,
    Layout,
    PackError,
    data_offset_for,
    header_bytes,
    named_layers,
)

MAGIC = b"HFR1"
FRAME = struct.Struct("<4sIQ")
HELLO, UPDATE, ACK, BYE, WELCOME, MODEL, ERROR = 1, 2, 3, 4, 5, 6, 7
# shared-memory path (a client on the server's node, same user): slots named by (index, gen)
SLOT_REQUEST, SLOT_GRANT, UPDATE_IN_SLOT, MODEL_IN_SLOT, RELEASE = 8, 9, 10, 11, 12
SLOT_PROGRESS = 13  # {upto}: the first `upto` bytes of the granted slot are written
SLOT_CREDIT = 14  # {upto}: the granted slot may be written below `upto` (a pass reads the rest)
KIND_NAMES = {
    1: "HELLO",
    2: "UPDATE",
    3: "ACK",
    4: "BYE",
    5: "WELCOME",
    6: "MODEL",
    7: "ERROR",
    8: "SLOT_REQUEST",
    9: "SLOT_GRANT",
    10: "UPDATE_IN_SLOT",
    11: "MODEL_IN_SLOT",
    12: "RELEASE",
    13: "SLOT_PROGRESS",
    14: "SLOT_CREDIT",
}
MAX_CONTROL = 64 << 10  # bytes of a control frame (HELLO/ACK/ERROR/WELCOME)
IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
SOCK_BUF = 8 << 20  # socket buffer request: fewer wake-ups per model
PAGE = 4096


class WireError(ConnectionError):
    """The peer broke the protocol or went away (message says which)."""


def frame(kind: int, length: int) -> bytes:
    return FRAME.pack(MAGIC, kind, length)


def tune(sock: socket.socket) -> None:
    """Large socket buffers and no Nagle delay (the models are big, the frames small)."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_into_exact(sock: socket.socket, mv: memoryview, on_chunk: Any = None) -> None:
    """Fill ``mv`` from the socket (the kernel copies straight into it). ``on_chunk(done)`` is
    called after each read with the bytes received so far."""
    got, n = 0, len(mv)
    while got < n:
        k = sock.recv_into(mv[got:], n - got)
        if k == 0:
            raise WireError(f"peer closed the connection after {got} of {n} bytes")
        got += k
        if on_chunk is not None:
            on_chunk(got)


def recv_chunks(
    sock: socket.socket,
    mv: memoryview,
    chunk: int,
    on_chunk: Any,
    credit: Callable[[int], int] | None = None,
) -> int:
    """Fill ``mv`` from the socket ``chunk`` bytes per read, calling ``on_chunk(done)`` after
    each (e.g. to check the range while it is in cache). Each read stays in the kernel until
    its whole chunk is copied (``MSG_WAITALL``): one return to Python per chunk, however the
    bytes arrive. (``SO_RCVLOWAT`` instead, which also spares the kernel's wake-ups, stalled
    rounds here: a reader was never woken.) ``credit(upto)``: blocks until the first ``upto``
    bytes of ``mv`` may be written and returns how many may (a fold pass still reads the rest
    of the slot); a read never goes past it. Returns the bytes read (fewer: the peer closed)."""
    got, n = 0, len(mv)
    allowed = n if credit is None else 0
    while got < n:
        want = min(chunk, n - got)
        if got + want > allowed and credit is not None:
            allowed = credit(got + want)
            if allowed <= got:
                raise WireError("no credit to receive into the slot (the server is closing)")
            want = min(want, allowed - got)
        k = sock.recv_into(mv[got:], want, socket.MSG_WAITALL)
        if k == 0:
            break
        got += k
        on_chunk(got)
    return got


def read_frame(sock: socket.socket) -> tuple[int, int]:
    """Read one frame header: (kind, length)."""
    hdr = bytearray(FRAME.size)
    recv_into_exact(sock, memoryview(hdr))
    magic, kind, length = FRAME.unpack(hdr)
    if magic != MAGIC or kind not in KIND_NAMES:
        raise WireError(f"not a round-endpoint frame (magic {bytes(magic)!r}, kind {kind})")
    return kind, length


def read_control(sock: socket.socket, length: int) -> bytes:
    if length > MAX_CONTROL:
        raise WireError(f"control frame of {length} bytes exceeds {MAX_CONTROL}")
    buf = bytearray(length)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def send_control(sock: socket.socket, kind: int, msg: Any) -> None:
    body = json.dumps(msg).encode() if kind == ERROR else msgpack.packb(msg)
    sock.sendall(frame(kind, len(body)) + body)


def send_control_nowait(sock: socket.socket, kind: int, msg: Any) -> None:
    """A control frame that must not block the sender (raises OSError if it cannot go out
    whole right now: the peer does not read)."""
    body = msgpack.packb(msg)
    data = frame(kind, len(body)) + body
    if sock.send(data, socket.MSG_DONTWAIT) != len(data):
        raise OSError("control frame sent in part: the peer does not read")


def send_iov(sock: socket.socket, bufs: list[memoryview]) -> int:
    """``sendmsg`` the buffers in order (scatter-gather: nothing is concatenated)."""
    bufs = [b for b in bufs if len(b)]
    sent_total = 0
    i = 0
    while i < len(bufs):
        batch = bufs[i : i + IOV_MAX]
        k = sock.sendmsg(batch)
        sent_total += k
        # skip what went out, keep the rest of a partially sent buffer
        while batch and k >= len(batch[0]):
            k -= len(batch[0])
            batch.pop(0)
            i += 1
        if k:
            bufs[i] = bufs[i][k:]
    return sent_total


def update_iov(
    model: Any, n: int, *, round: int | None, client: str | None
) -> tuple[list[memoryview], int]:
    """The packed update as a list of buffers: the header block, then every layer's bytes (a
    view of the caller's array) with zero padding where the layout aligns the next layer.
    Returns (buffers, total bytes). Only the header and padding are new memory."""
    layers = named_layers(model)
    layout = Layout(tuple(LayerSpec(nm, a.dtype, a.shape) for nm, a in layers))
    hb = header_bytes(Header("update", int(n), layout, round, client))
    off = data_offset_for(len(hb))
    head = bytearray(off)  # prefix + msgpack header; the data goes out from the arrays
    PREFIX.pack_into(head, 0, PACK_MAGIC, VERSION, 0, len(hb), off)
    head[PREFIX.size : PREFIX.size + len(hb)] = hb
    bufs: list[memoryview] = [memoryview(head)]
    pos = 0
    for (_, arr), bo, ly in zip(layers, layout.byte_offsets, layout.layers, strict=True):
        if bo > pos:
            bufs.append(memoryview(bytes(bo - pos)))
            pos = bo
        if ly.size:
            a = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # non-contiguous: copy
            bufs.append(memoryview(a).cast("B"))
            pos += ly.nbytes
    return bufs, off + layout.data_nbytes


def write_iov(
    view: memoryview,
    bufs: list[memoryview],
    chunk: int = 0,
    on_chunk: Any = None,
    credit: Callable[[int], int] | None = None,
) -> int:
    """Copy the buffers back to back into ``view`` (e.g. a granted slot); returns the bytes.
    numpy copies without the GIL (a memoryview assignment holds it), so client threads of one
    process copy at the same time. ``chunk``: copy at most that many bytes at a time and call
    ``on_chunk(written)`` each time at least ``chunk`` more bytes are written (not after the
    last piece). ``credit(upto)``: blocks until the first ``upto`` bytes of ``view`` may be
    written and returns how many may (a fold pass still reads the rest of the slot); no byte
    is written past it."""
    dst = np.frombuffer(view, np.uint8)
    pos = told = 0
    allowed = len(view) if credit is None else 0
    step = chunk if chunk > 0 else 1 << 62
    for b in bufs:
        src = np.frombuffer(b, np.uint8)
        s = 0
        while s < len(src):
            piece = src[s : s + step]
            if pos + len(piece) > allowed:
                if credit is not None:
                    if pos >= allowed:  # nothing left to write below the credit: wait for more
                        allowed = credit(pos + len(piece))
                    piece = piece[: max(0, allowed - pos)]
                if not len(piece):
                    raise ValueError(f"no credit to write past byte {pos}")
            np.copyto(dst[pos : pos + len(piece)], piece)
            pos += len(piece)
            s += len(piece)
            if on_chunk is not None and pos - told >= step and pos < len(view):
                on_chunk(pos)
                told = pos
    return pos


def slot_file_offset(pool: Any, index: int) -> int:
    """Offset of slot ``index`` in the pool's ``/dev/shm`` file (from the pool header)."""
    for size, count, first, off in pool.classes:
        if first <= index < first + count:
            return off + (index - first) * size
    raise ValueError(f"slot {index} is not in pool {pool.name!r}")


def read_update_header(view: memoryview, hlen: int) -> Header:
    """Parse only the header block (the data has not arrived yet)."""
    if bytes(view[:4]) != PACK_MAGIC:
        raise PackError("not a packed update (bad magic)")
    try:
        d = msgpack.unpackb(view[PREFIX.size : PREFIX.size + hlen])
        return Header(
            d["kind"], d["n"], Layout.from_wire(d["layers"]), d.get("round"), d.get("client")
        )
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
        raise PackError(f"unreadable header: {e}") from None


def is_loopback(sock: socket.socket) -> bool:
    try:
        peer = sock.getpeername()[0]
    except OSError:
        return False
    return peer in ("127.0.0.1", "::1") or peer.startswith("127.")


def send_error(sock: socket.socket, error: str, detail: str) -> None:
    try:
        send_control(sock, ERROR, {"error": error, "detail": detail})
    except OSError:
        pass
