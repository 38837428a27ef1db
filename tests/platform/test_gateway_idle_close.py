"""A connection holds a descriptor of the node: one without a request in progress (nothing sent,
part of a head, idle after an answer) is closed after HEARTH_IDLE_S. It was held for aiohttp's
hour, whatever the client sent. A real node, with a 1 s bound so the test is short."""

from __future__ import annotations

import socket
import time

import pytest
from hearth_proc import start_hearth, stop_hearth

H = "hearth.functions.examples.handlers"
IDLE_S = 1.0


@pytest.fixture(scope="module")
def node(redis_server, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    h = start_hearth(
        tmp_path_factory.mktemp("idle"), redis_server.url, "unix", {"HEARTH_IDLE_S": str(IDLE_S)}
    )
    h.deploy(name="echo", handler=f"{H}:echo")
    yield h
    stop_hearth(h)


def closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the node closes `sock` (reading and dropping what it sends); fails if it
    is still open after `limit`."""
    sock.settimeout(limit)
    t0 = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit:g}s")
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"POST /v1/func",
        b"POST /v1/functions/echo:invoke HTTP/1.1\r\nHost: x\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"POST /v1/functions HTTP/1.1\r\nHost: x\r\nContent-Type: appl",
    ],
    ids=["nothing", "part-of-line", "invoke-head-part", "get-head-part", "deploy-head-part"],
)
def test_a_connection_without_a_whole_request_is_closed(node, sent):
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(sent)
        assert closed_after(s, 20 * IDLE_S) >= IDLE_S * 0.9
    # the node goes on serving
    assert node.client.invoke("echo", b"{}", "application/json").json() == {}


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(node):
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/functions/echo:invoke HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_after(s, 20 * IDLE_S) < 20 * IDLE_S


def _invoke(s: socket.socket, name: str, body: bytes) -> bytes:
    """One keep-alive request on `s` (over the node's lean path when it takes it); the answer."""
    s.sendall(
        f"POST /v1/functions/{name}:invoke HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while True:
        head, sep, body = got.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(body) >= length:
                return got
        chunk = s.recv(65536)
        assert chunk, f"closed with a request in progress (got {got!r})"
        got += chunk


def test_a_busy_keep_alive_connection_stays_open(node):
    """Requests every 0.3 s on one connection for 4x the bound: each answered on it (the
    bound counts from the last answer, not from the connection's start)."""
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4 * IDLE_S:
            assert _invoke(s, "echo", b"{}").startswith(b"HTTP/1.1 200")
            time.sleep(0.3)


def test_a_call_longer_than_the_bound_is_answered(node):
    """A request in progress is not idle: a call of 2.5x the bound gets its answer."""
    node.deploy(name="idle-sleep", handler=f"{H}:sleep")
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(15)
        got = _invoke(s, "idle-sleep", b'{"seconds": 2.5}')
        assert got.startswith(b"HTTP/1.1 200"), got
