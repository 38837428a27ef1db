"""Requests too malformed to reach a handler: answered as JSON `{error, detail}`, one log line.

Why: aiohttp answers a request its parser refuses (a `Content-Length: -1`, a request line or
header over 8,190 bytes, a raw space or non-ASCII byte in the path, an unknown method) itself,
before any middleware: a `text/plain` 400 with the parser's dump of the bytes, and an ERROR
with a full traceback in the node's log for each one. Every other error of the gateway is JSON,
and a client must not be able to fill the node's log with tracebacks. So each connection's
aiohttp protocol is `JsonErrors`, whose `handle_error` answers the same status with a JSON body
naming the problem in one line, logged at DEBUG (a client's mistake, not the node's). A 5xx
there (a failure aiohttp caught outside the app's middleware) is still logged with its
traceback, and answered as JSON too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

_LIMIT = re.compile(r"more than (\d+) bytes")


def detail(exc: BaseException | None, message: str | None) -> str:
    """One line saying what is wrong with the request (no dump of its bytes)."""
    text = getattr(exc, "message", None) or message or ""
    if isinstance(exc, LineTooLong):
        m = _LIMIT.search(text)
        limit = f" {m.group(1)} bytes" if m else " the limit"
        return f"malformed HTTP request: a request line or header is longer than{limit}"
    first = text.strip().splitlines()[0].rstrip(": ") if text.strip() else ""
    return f"malformed HTTP request: {first[:200] or 'the request could not be parsed'}"


class JsonErrors(RequestHandler):
    """aiohttp's connection protocol, with its own error answers as JSON (see the module)."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.debug("refused a malformed request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:  # part of an answer went out: nothing can follow
            raise ConnectionError("response already started: no error answer can follow")
        if status >= 500:
            error, text = "internal_error", "the gateway failed to handle the request"
        else:
            error, text = "bad_request", detail(exc, message)
        body = json.dumps({"error": error, "detail": text}).encode()
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp


def protocols(server: web.Server) -> Callable[[], RequestHandler]:
    """A factory of `server`'s connection protocols as `JsonErrors` (what `server()` makes,
    with the same settings); `server` itself if this aiohttp keeps them elsewhere."""
    kwargs, loop = getattr(server, "_kwargs", None), getattr(server, "_loop", None)
    if kwargs is None or loop is None:
        return server
    return lambda: JsonErrors(server, loop=loop, **kwargs)
