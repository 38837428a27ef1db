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

#: each status's first line, built once (a status missing here gets an empty reason)
_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n" for s in HTTPStatus}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"


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
    """An Answer as HTTP/1.1 response bytes (keep-alive unless `close`). Built as one string
    with no comprehension or list: it runs once per warm call, on a cold cache (#19)."""
    status = a.status
    head = _LINES.get(status) or f"HTTP/1.1 {status} \r\n"
    for k, v in a.headers.items():
        head += f"{k}: {v}\r\n"
    if close:
        head += "Connection: close\r\n"
    body = a.body
    if status in _EMPTY:
        body = b""
    else:
        head += f"Content-Length: {len(body)}\r\n"
    # A function's Date or Server is sent, not twice. Every header line follows a CRLF and
    # none holds one (`route._header_ok`), so a name is found only where a line starts.
    low = head.lower()
    if "\r\ndate:" not in low:
        head += f"Date: {_DATE.now()}\r\n"
    if "\r\nserver:" not in low:
        head += _SERVER
    return (head + "\r\n").encode("utf-8", "replace") + body
