"""The link's frame format and its limits (no I/O).

A connection carries messages ``[header 24 B][meta: msgpack, meta_len B][data: data_len B]``;
the header is ``<BBHIQQ``: type, flags, status, meta_len, request id, data_len. Requests go from
the dialling agent to the listening one; replies, errors and pongs come back on the same
connection."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

REQ, REP, ERR, PING, PONG = 1, 2, 3, 4, 5

HEADER = struct.Struct("<BBHIQQ")

BUF = 64 << 10

#: a frame's meta is read whole into the read buffer, after its header
MAX_META = BUF - HEADER.size

#: transfers at least this big run their system calls in a worker thread (blocking on poll, so
#: the event loop takes no wake-up per socket-buffer's worth and keeps serving small calls)
BULK = 1 << 20


class LinkError(ConnectionError):
    """The link broke or the peer is not who it must be."""


class AuthError(LinkError):
    pass


#: a whole small frame: (type, status, request id, meta bytes, data bytes), views of the buffer
Frame = tuple[int, int, int, memoryview, memoryview]

#: Reader.frame(): the next frame is larger than the buffer
STREAM = object()


def frame(kind: int, rid: int, meta: bytes, data_len: int = 0, status: int = 0) -> bytes:
    return HEADER.pack(kind, 0, status, len(meta), rid, data_len) + meta


#: where a reply body of n bytes (with its meta) goes: (view to fill, handle for the caller)
Sink = Callable[[int, dict], tuple[memoryview, Any]]

#: where a message's data lands: (view to fill, handle for whoever gets the data, give-back if
#: the data never reaches them)
Dest = tuple[memoryview, Any, Callable[[], None]]
