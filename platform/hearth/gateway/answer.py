"""An HTTP answer as plain data (status, headers, body), so the gateway's two ways of answering
(aiohttp's `web.Response`, and the fast path's bytes: `gateway.httpresponse.encode`) build the same one."""

from __future__ import annotations

import json

from aiohttp import web

RETRY_AFTER_S = 1  # what back-pressure answers tell clients to wait
JSON_TYPE = "application/json; charset=utf-8"


class Answer:
    """An HTTP answer to send: status, headers (with Content-Type) and body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @classmethod
    def error(
        cls, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> Answer:
        """The JSON `{error, detail}` every failure gets."""
        body = json.dumps({"error": error, "detail": detail}).encode()
        return cls(status, {**(headers or {}), "Content-Type": JSON_TYPE}, body)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, content_type=None, headers=self.headers
        )


def overloaded(detail: str) -> Answer:
    """503 `overloaded` + Retry-After: the node is behind; a retry later will be served."""
    return Answer.error(503, "overloaded", detail, {"Retry-After": str(RETRY_AFTER_S)})
