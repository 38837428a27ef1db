"""Requests the HTTP parser refuses, sent byte for byte to a real node: a JSON 400 naming the
problem, no traceback in the node's log, and the node serves the next call with its slot pool
empty."""

from __future__ import annotations

import json
import socket

import pytest
from hearth_proc import start_hearth, stop_hearth

H = "hearth.functions.examples.handlers"


@pytest.fixture(scope="module")
def gw(redis_server, tmp_path_factory):
    """A node of its own: its body limit (96 MiB) is above the async event limit (1 MiB)."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    h = start_hearth(tmp_path_factory.mktemp("bad-requests"), redis_server.url, "auto")
    h.deploy(name="echo", handler=f"{H}:echo")
    yield h
    stop_hearth(h)


def send(gw, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """`data` on a new connection; the status, headers and body of the answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(ln.split(": ", 1) for ln in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def tracebacks(gw) -> int:
    return gw.node.log_path.read_text(errors="replace").count("Traceback")


INVOKE = b"POST /v1/functions/echo:invoke HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "says"),
    [
        (INVOKE + b"Content-Length: -1\r\n\r\n", "Invalid character in Content-Length"),
        (INVOKE + b"Content-Length: abc\r\n\r\n", "Invalid character in Content-Length"),
        (
            b"GET /v1/functions/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            "a request line or header is longer than 8190 bytes",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n",
            "a request line or header is longer than 8190 bytes",
        ),
        (b"POST /v1/functions/\xc3\xa9:invoke HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid char in url"),
        (b"GET /v1/functions/ec ho HTTP/1.1\r\nHost: x\r\n\r\n", "Bad status line"),
        (b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid method"),
    ],
)
def test_a_request_the_parser_refuses_is_a_json_400_without_traceback(gw, request_bytes, says):
    before = tracebacks(gw)
    status, headers, body = send(gw, request_bytes)
    assert status == 400, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)
    assert err["error"] == "bad_request", err
    assert err["detail"].startswith("malformed HTTP request: ") and says in err["detail"], err
    assert "\n" not in err["detail"] and len(err["detail"]) < 300, err
    assert tracebacks(gw) == before, gw.node.log_tail()
    # the node goes on: the next call is served and holds no slot after it
    assert gw.client.invoke("echo", b'{"a": 1}', "application/json").json() == {"a": 1}
    assert gw.client.status()["pool"]["used"] == 0


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/functions/echo:invoke", "POST"),
        ("DELETE", "/v1/functions", "GET, HEAD, POST"),
        ("PATCH", "/v1/functions/echo", "DELETE, GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
    ],
)
def test_a_wrong_method_is_a_405_naming_the_methods_with_allow(gw, method, path, allowed):
    req = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    status, headers, body = send(gw, req.encode())
    assert status == 405 and headers.get("allow") == allowed, (status, headers, body)
    err = json.loads(body)
    assert err == {
        "error": "method_not_allowed",
        "detail": f"{method} {path}: this path takes {allowed}",
    }


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/v1/functions/Echo:invoke", "a function name is 1-63 lowercase letters"),
        ("/v1/functions/ec%2Fho:invoke", "a function name is 1-63 lowercase letters"),
        ("/v1/streams/hearth:registry:publish", "a stream name has no ':' or '/'"),
        ("/v2/whatever", "not a path of this API (see /openapi.json)"),
    ],
)
def test_a_path_no_route_takes_is_a_404_saying_why(gw, path, why):
    req = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    status, headers, body = send(gw, req.encode())
    err = json.loads(body)
    assert status == 404 and err["error"] == "not_found", (status, body)
    assert err["detail"].startswith("POST /v") and why in err["detail"], err


def test_an_async_body_over_the_event_limit_is_a_413(gw):
    from hearth.queue.wire import MAX_EVENT_BYTES

    body = b"a" * (MAX_EVENT_BYTES + 1)
    req = (
        b"POST /v1/functions/echo:invoke?async=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/octet-stream\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, headers, answer = send(gw, req)
    assert status == 413, (status, answer)
    assert json.loads(answer) == {
        "error": "payload_too_large",
        "detail": f"event payload is {len(body)} bytes; the limit is {MAX_EVENT_BYTES} bytes",
    }
    assert gw.client.status()["pool"]["used"] == 0


@pytest.mark.parametrize("value", ["maybe", "2", "on%00"])
def test_an_async_value_neither_true_nor_false_is_a_400(gw, value):
    # it used to run the call synchronously (a caller expecting a 202 and an id got the result)
    req = (
        f"POST /v1/functions/echo:invoke?async={value} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, _, body = send(gw, req.encode())
    assert status == 400, (status, body)
    assert json.loads(body)["detail"].startswith("async must be true or false (1/0, yes/no), not")
    assert gw.client.status()["pool"]["used"] == 0
