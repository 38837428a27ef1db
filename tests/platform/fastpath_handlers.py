"""Function code for the gateway fast-path tests (tests/platform/test_gateway_fastpath.py)."""

from __future__ import annotations

import json
import time

from hearth.sdk import Event, Response


def reply(event: Event) -> Response:
    """Answers 201 with the request headers it saw, and reply headers of every kind: a plain
    one, its own Server, a hop-by-hop one (dropped by the gateway) and one with a line break
    (dropped too)."""
    return Response(
        body=json.dumps({"headers": event.headers, "body": bytes(event.payload).decode()}),
        status=201,
        content_type="application/json",
        headers={
            "X-Reply": "yes",
            "server": "fn/1",  # its own (sent once)
            "Connection": "close",
            "X-Split": "a\r\nInjected: 1",
        },
    )


def nap(event: Event) -> dict:
    """Sleeps for the number of seconds in its body (holds its only instance meanwhile)."""
    s = float(bytes(event.payload) or b"0")
    time.sleep(s)
    return {"slept": s}


def status(event: Event) -> Response:
    """Answers the status in its body, with a body that is a whole HTTP response: where the
    status has no body (204, 304) or is interim (1xx), sending it would forge the next answer."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: 1\r\n\r\nforged"
    return Response(body=forged, status=int(bytes(event.payload)), content_type="text/plain")


def odd_type(event: Event) -> Response:
    """A reply whose content type is not text: HTTP cannot carry it (a 502 on both paths)."""
    return Response(b"hi", content_type=5)  # type: ignore[arg-type]
