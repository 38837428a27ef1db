"""The cold-start benchmark's clock starts when the request leaves the client (its first
write), not before http.client builds it: a real server, a real http.client connection."""

from __future__ import annotations

import http.client
import socket
import threading
import time

from benchmark_module import load_benchmark

cold_start = load_benchmark("cold_start")


def test_write_stamp_is_the_first_write_and_the_request_is_unchanged():
    srv = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []
    seen_at: list[float] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf or len(buf) < buf.index(b"\r\n\r\n") + 4 + 5000:
                chunk = conn.recv(65536)
                if not seen_at:
                    seen_at.append(time.time())
                if not chunk:
                    break
                buf += chunk
            got.append(buf)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    t = threading.Thread(target=serve)
    t.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.getsockname()[1], timeout=10)
    try:
        conn.connect()
        stamp = cold_start.WriteStamp(conn.sock)
        conn.sock = stamp
        t0 = time.time()
        conn.request("POST", "/x", body=b"y" * 5000, headers={"Content-Type": "a/b"})
        assert conn.getresponse().read() == b"{}"  # reads go through the wrapped socket
    finally:
        conn.close()
        t.join(10)
        srv.close()
    assert stamp.t is not None and t0 <= stamp.t <= seen_at[0]
    head, _, body = got[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /x HTTP/1.1") and b"Content-Length: 5000" in head
    assert body == b"y" * 5000  # a body written separately (>= 2000 bytes) arrives whole
