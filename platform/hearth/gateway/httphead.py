"""Which requests the node gateway's fast path (`hearth.gateway.fastpath`) takes: the simple
invoke's head, checked (`parse_head`: the request, MORE or OTHER; the rules are in fastpath's
docstring). Checked heads are kept by their bytes, since a keep-alive client sends one head
again and again. Apart from the connection's protocol so the parse reads alone and is tested
without a connection.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict

from hearth.gateway.body import SMALL_BODY

MAX_HEAD = 8190  # aiohttp's line limit: a longer head is left to aiohttp's limits

_LINE = re.compile(rb"POST /v1/functions/([a-z0-9][a-z0-9-]*):invoke HTTP/1\.1")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab, CR and LF too
_DIGITS = re.compile(rb"[0-9]{1,10}")
#: headers whose presence sends the request to aiohttp (async calls, other framings, upgrades)
_DELEGATED = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"prefer"})


class Request:
    """A complete simple invoke, parsed: function name, headers, body."""

    __slots__ = ("name", "headers", "length", "body", "end", "close")

    def __init__(
        self,
        name: str,
        headers: CIMultiDict[str],
        length: int,
        body: bytes | None,
        end: int,
        close: bool,
    ) -> None:
        self.name, self.headers, self.length = name, headers, length
        self.body = body  # None: not all here yet (read by `FastTap._body`)
        self.end = end  # where the request (or its head, body pending) ends in the buffer
        self.close = close  # Connection: close: the last request of its connection


#: `parse_head` outcomes besides a Request
MORE = "more"  # the head has not all arrived: wait for more bytes
OTHER = "other"  # not the fast path's: hand the connection to aiohttp


#: heads parsed (a keep-alive client sends one head again and again; bounded: cleared when full)
_PARSED: dict[bytes, tuple[str, tuple[tuple[str, str], ...], int, bool] | str] = {}
PARSED_MAX = 256


def parse_head(buf: bytes) -> Request | str:
    """The simple invoke at the start of `buf` (see the module docstring), MORE or OTHER."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end < 0:
        if len(buf) > MAX_HEAD or not buf.startswith(b"POST /v1/"[: len(buf)]):
            return OTHER
        # a line ended by a bare LF: this head may never end in CRLF CRLF (aiohttp judges it)
        return OTHER if buf.count(b"\n") != buf.count(b"\r\n") else MORE
    got = _PARSED.get(head := buf[:end])
    if got is None:  # (a parse is ~6 us of the agent's CPU on a warm call's path; a hit ~2)
        got = _parse_lines(head)
        if len(_PARSED) >= PARSED_MAX:
            _PARSED.clear()
        _PARSED[head] = got
    if isinstance(got, str):
        return got
    name, fields, length, close = got
    start = end + 4
    headers = CIMultiDict(fields)  # each request its own (a caller may change it)
    if len(buf) < start + length:  # the body is on its way
        return Request(name, headers, length, None, start, close)
    body = buf[start : start + length]
    return Request(name, headers, length, body, start + length, close)


def _parse_lines(head: bytes) -> tuple[str, tuple[tuple[str, str], ...], int, bool] | str:
    """A complete head's lines, checked: OTHER, or (name, fields, Content-Length, close)."""
    lines = head.split(b"\r\n")
    m = _LINE.fullmatch(lines[0])
    if m is None:
        return OTHER
    fields = []
    names = set()
    length = None
    close = False
    for line in lines[1:]:
        k, colon, v = line.partition(b":")
        v = v.strip(b" \t")
        if not colon or _TOKEN.fullmatch(k) is None or _CTL.search(v) is not None:
            return OTHER
        kl = k.lower()
        if kl in names or kl in _DELEGATED:
            return OTHER
        names.add(kl)
        if kl == b"content-length":
            if _DIGITS.fullmatch(v) is None:
                return OTHER
            length = int(v)
        elif kl == b"connection":
            close = v.lower() == b"close"
            if not close and v.lower() != b"keep-alive":
                return OTHER
        fields.append((k.decode("ascii"), v.decode("utf-8", "surrogateescape")))
    if length is None or length > SMALL_BODY or b"host" not in names:
        return OTHER  # (an HTTP/1.1 request without Host is aiohttp's 400)
    return m.group(1).decode("ascii"), tuple(fields), length, close
