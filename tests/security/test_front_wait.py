"""The front gateway's own wait bound: an invoke that waited in the front longer than
HEARTH_MAX_QUEUE_WAIT_S since the front read it is answered 503 + Retry-After, not passed on
(the node's rule, `hearth.gateway.sojourn.over_wait`, applied at the front)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

from hearth.localnode import start_front

WAIT_S = 1.0  # the front's bound
SLOW_S = 3.0  # the agent's answer to the slow first request: 3x the bound
PUBLISH, INVOKE = "/v1/streams/s:publish", "/v1/functions/f:invoke"


def _responses(sock: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """`n` HTTP/1.1 responses (Content-Length bodies) read from `sock`, in order."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        size = int(headers["content-length"])
        while len(buf) < size:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            buf += chunk
        out.append((int(lines[0].split()[1]), headers, buf[:size]))
        buf = buf[size:]
    return out


def test_a_call_that_waited_in_the_front_past_the_bound_is_answered_503(tmp_path):
    """Through a real `hearth up --role gateway` with a 1 s bound, in front of an agent that
    takes 3 s to answer a publish: a publish and an invoke pipelined on one connection are read
    together, and the invoke's handler runs only after the publish is answered, 3 s after its
    read. It is answered 503 `overloaded` + Retry-After by the front and never reaches the agent
    (before, the front passed it on, late). The publish is not an invoke: passed on however
    late; an invoke that did not wait is passed on as before."""
    calls: list[str] = []

    class Agent(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            if self.path == PUBLISH:
                time.sleep(SLOW_S)
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a) -> None:
            pass

    agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    front = start_front(
        tmp_path,
        [f"http://127.0.0.1:{agent.server_address[1]}"],
        env={"HEARTH_MAX_QUEUE_WAIT_S": str(WAIT_S), "HEARTH_SHED_LOOP_LAG_S": "0"},
    )
    try:
        host, port = front.url.removeprefix("http://").split(":")

        def req(path: str) -> bytes:
            return (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            ).encode()

        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(req(PUBLISH) + req(INVOKE))  # pipelined: both read at once
            (st1, _, b1), (st2, h2, b2) = _responses(s, 2)
        assert (st1, json.loads(b1)) == (200, {"ok": True})
        body = json.loads(b2)
        assert (st2, body["error"], h2.get("retry-after")) == (503, "overloaded", "1"), body
        assert "front gateway" in body["detail"]
        assert calls == [PUBLISH]  # the late invoke never reached the agent
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(req(INVOKE))  # did not wait: passed on
            ((st3, _, _),) = _responses(s, 1)
        assert st3 == 200 and calls == [PUBLISH, INVOKE]
    finally:
        front.stop()
        agent.shutdown()
        agent.server_close()
