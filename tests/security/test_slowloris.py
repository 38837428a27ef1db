"""H4: idle and slow clients cannot take the slot pool or the gateway.

Thousands of connections send their headers and then nothing (or a byte now and then). They hold no
slot while their bodies trickle in, each one is answered 408 once its deadline passes, one client
address can only have so many bodies in flight, and a normal invoke still gets through."""

from __future__ import annotations

import select
import socket
import time

from hearth.client import Client
from sec_helpers import TOKEN, connect_from, deploy, free_loopback_source

N_CONN = 2000
SOURCES = 10  # client addresses 127.0.0.2.. (each under the per-client limit)


# the node under test (conftest.size_node)
NODE_ENV = {
    "HEARTH_POOL_CLASSES": "64KiB:64,1MiB:8,16MiB:2",
    "HEARTH_BODY_GRACE_S": "4",
    "HEARTH_BODY_INFLIGHT_BYTES": "8MiB",
}
SIZE_SPEC = {"concurrency": 4}


def _port(size_node) -> int:
    return int(size_node.url.rsplit(":", 1)[1])


def _head(length: int | None, path: str = "/v1/functions/size:invoke") -> bytes:
    cl = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n{cl}\r\n"
    ).encode()


def _status(s: socket.socket, timeout: float) -> int | None:
    """The status code the server sent on `s` within `timeout`, else None."""
    r, _, _ = select.select([s], [], [], timeout)
    if not r:
        return None
    try:
        data = s.recv(200)
    except OSError:
        return -1
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else -1


def _used(size_node) -> int:
    return size_node.client.status()["pool"]["used"]


def test_idle_and_slow_bodies_leave_the_pool_and_normal_invokes_alone(size_node):
    port = _port(size_node)
    conns = []
    try:
        for i in range(N_CONN):
            s = connect_from(free_loopback_source(i % SOURCES), port)
            s.sendall(_head(1000))
            if i % 2:
                s.sendall(b"x")  # a slow one: a byte so far
            conns.append(s)
        time.sleep(0.5)  # let the gateway take in every header
        for s in conns[1::2]:
            s.sendall(b"y")
        assert _used(size_node) < 8, "bodies that have not arrived hold slots"
        quick = Client(size_node.url, token=TOKEN, timeout=2.0)  # must answer within 2 s
        for _ in range(5):
            r = quick.invoke("size", b"hello", "application/octet-stream")
            assert r.status == 200 and r.json() == {"bytes": 5}
        # past their deadline (grace 4 s + 1000 B at the minimum rate) each gets a 408
        statuses = [_status(s, 15.0) for s in conns[:50]]
        assert statuses.count(408) == 50, statuses
    finally:
        for s in conns:
            s.close()


def test_one_client_address_has_a_bounded_number_of_bodies_in_flight(size_node):
    port = _port(size_node)
    src = free_loopback_source(100)
    conns = []
    try:
        for _ in range(300):
            s = connect_from(src, port)
            s.sendall(_head(10))
            conns.append(s)
        late = [_status(s, 0.0) for s in conns]
        time.sleep(1.0)
        late = [_status(s, 0.2) if st is None else st for s, st in zip(conns, late, strict=True)]
        assert late.count(429) >= 300 - 256, late  # past the per-client limit: 429 at once
        r = Client(size_node.url, token=TOKEN, timeout=2.0).invoke("size", b"ok")
        assert r.status == 200  # other addresses are not affected
    finally:
        for s in conns:
            s.close()


def test_bodies_without_length_share_a_byte_budget(size_node):
    port = _port(size_node)
    conns = []
    try:
        for i in range(4):
            s = connect_from(free_loopback_source(200 + i), port)
            s.sendall(_head(None))
            chunk = b"z" * (3 << 20)
            s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")  # 3 MiB, then stall
            conns.append(s)
        statuses = [_status(s, 3.0) for s in conns]
        assert 503 in statuses, statuses  # 4 x 3 MiB > the 8 MiB budget
        assert Client(size_node.url, token=TOKEN, timeout=2.0).invoke("size", b"ok").status == 200
    finally:
        for s in conns:
            s.close()


def test_a_small_body_in_two_pieces_arrives_whole(size_node):
    """A body that has not all come with the headers is read to its end (the bytes that had
    arrived first included), in order, and answered."""
    deploy(size_node, "upper", "upper")
    first, rest = b"ab" * 200, b"cd" * 300
    with socket.create_connection(("127.0.0.1", _port(size_node)), timeout=10) as s:
        s.sendall(_head(len(first) + len(rest), "/v1/functions/upper:invoke") + first)
        time.sleep(0.3)  # the handler is waiting for the rest by now
        s.sendall(rest)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        n = next(
            int(h.split(b":")[1])
            for h in head.split(b"\r\n")
            if h.lower().startswith(b"content-length:")
        )
        while len(body) < n:
            body += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body == (first + rest).upper()
