"""An `Answer` as HTTP/1.1 response bytes (`encode`), for the node gateway's fast path
(`hearth.gateway.fastpath`), which writes them straight to the transport instead of building
aiohttp's response objects.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

from hearth.gateway.answer import Answer

_REASONS = {int(s): s.phrase for s in HTTPStatus}


class _Date:
    """The Date header's value, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second, self.value = -1, ""

    def now(self) -> str:
        t = int(time.time())
        if t != self.second:
            self.second, self.value = t, formatdate(t, usegmt=True)
        return self.value


_DATE = _Date()


#: statuses whose responses have no body (RFC 9110 6.4.1): a client reads any bytes after their
#: head as the next response, so a function's body there would forge one (aiohttp drops it too)
_EMPTY = frozenset({204, 304})


def encode(a: Answer, close: bool = False) -> bytes:
    """An Answer as HTTP/1.1 response bytes (keep-alive unless `close`)."""
    head = [f"HTTP/1.1 {a.status} {_REASONS.get(a.status, '')}\r\n"]
    head += [f"{k}: {v}\r\n" for k, v in a.headers.items()]
    if close:
        head.append("Connection: close\r\n")
    body = a.body
    if a.status in _EMPTY:
        body = b""
    else:
        head.append(f"Content-Length: {len(body)}\r\n")
    given = {k.lower() for k in a.headers}  # a function's Date or Server is sent, not twice
    if "date" not in given:
        head.append(f"Date: {_DATE.now()}\r\n")
    if "server" not in given:
        head.append(f"Server: {SERVER_SOFTWARE}\r\n")
    head.append("\r\n")
    return "".join(head).encode("utf-8", "replace") + body
