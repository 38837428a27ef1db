"""The lean open-loop load generator of benchmarks/gateway_overhead.py (benchmarks/lean_load.py),
against real loopback servers: every request answered and timed to its response's last byte
(Content-Length, chunked, close-delimited), only 200s timed, errors counted, lost connections
replaced, a per-request deadline; and the p50 target's judgement in gateway_report.py."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest
from benchmark_module import load_benchmark
from hearth.redis_server import free_port

lean = load_benchmark("lean_load")


def _serve(code: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the test server did not come up")


def _run(code: str, seconds: float, rate: float, **kw) -> dict:
    """`run_open_loop` against a server running `code`, bounded by a 20 s guard (a run that
    would hang fails the test instead)."""
    port = free_port()
    proc = _serve(code, port)
    try:
        return asyncio.run(
            asyncio.wait_for(
                asyncio.to_thread(
                    lean.run_open_loop, f"http://127.0.0.1:{port}/x", seconds, rate, **kw
                ),
                20,
            )
        )
    finally:
        proc.kill()
        proc.wait()


# A server for the tests: `answer(t, n)` is called for the n-th request on a connection (from
# 1); `later(s, f, *a)` runs f after s seconds.
SERVER = """
import asyncio, sys
def later(s, f, *a):
    asyncio.get_running_loop().call_later(s, f, *a)
%s
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf, self.n = t, b"", 0
    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\\r\\n\\r\\n")) >= 0:
            self.buf = self.buf[end + 4:]
            self.n += 1
            answer(self.t, self.n)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""

# every 4th request (counted over all connections) a 500 at once: a fast error; the 10th: its
# connection closed without an answer; the others 200 after 10 ms, the body's second piece 20 ms
# after the head
ODD = (
    SERVER
    % """
count = [0]
def answer(t, n):
    count[0] += 1
    if count[0] == 10:
        later(0.01, t.close)
    elif count[0] % 4 == 0:
        t.write(b"HTTP/1.1 500 Oops\\r\\ncontent-length: 0\\r\\n\\r\\n")
    else:
        later(0.01, t.write, b"HTTP/1.1 200 OK\\r\\ncontent-length: 5\\r\\n\\r\\nab")
        later(0.03, t.write, b"cde")
"""
)


def test_every_request_to_the_static_responder_is_answered_and_timed():
    got = _run(lean.RESPONDER, 0.5, 400)
    assert got["n"] == got["sent"] == 200 and got["errors"] == 0 and got["timed_out"] == 0
    assert len(got["lat"]) == len(got["lat_intended"]) == len(got["late"]) == 200
    assert all(0 < x < 1.0 for x in got["lat"])
    # from the intended send time: never less than from the actual one
    assert all(i >= x for x, i in zip(got["lat"], got["lat_intended"], strict=True))
    assert 1 <= got["connections"] <= 200


def test_only_200s_are_timed_to_the_bodys_last_byte_and_errors_are_counted():
    # 50 requests, 5 ms apart, each 200 answered 10-30 ms later: several in flight at once
    got = _run(ODD, 0.25, 200)
    assert got["sent"] == 50 and got["errors"] == 12 + 1  # the 500s, the unanswered one
    assert got["n"] == len(got["lat"]) == 50 - 13
    # the body's second piece came 30 ms after the request (the head after 10 ms); the fast
    # 500s are not among the latencies
    assert min(got["lat"]) >= 0.029
    assert got["timed_out"] == 0


# the head, then the body in chunks or to the connection's end, its end 20 ms later
CHUNKED = (
    SERVER
    % """
def answer(t, n):
    t.write(b"HTTP/1.1 200 OK\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n3;x=y\\r\\nabc\\r\\n")
    later(0.02, t.write, b"2\\r\\nde\\r\\n0\\r\\n\\r\\n")
"""
)
CLOSE_DELIMITED = (
    SERVER
    % """
def answer(t, n):
    t.write(b"HTTP/1.1 200 OK\\r\\nconnection: close\\r\\n\\r\\nabc")
    later(0.02, t.write, b"de")
    later(0.02, t.close)
"""
)


@pytest.mark.parametrize("code", [CHUNKED, CLOSE_DELIMITED], ids=["chunked", "close-delimited"])
def test_a_body_without_content_length_is_read_to_its_end(code):
    got = _run(code, 0.2, 100)  # 20 requests, 10 ms apart
    assert got["errors"] == 0 and got["n"] == got["sent"] == 20
    assert min(got["lat"]) >= 0.019  # timed at the body's end, not at the head
    if code is CLOSE_DELIMITED:
        assert got["opened"] == 20  # the connection ended with each response: a new one each


def test_parse_response():
    p = lean.parse_response
    assert p(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab", False) == (200, 40, False)
    assert p(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\na", False) is None
    head = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    body = b"1\r\na\r\n0\r\nTrailer: 1\r\n\r\n"
    assert p(head + body, False) == (503, len(head + body), True)
    assert p(head + body[:-2], False) is None
    assert p(b"HTTP/1.1 204 No\r\n\r\nHTTP/1.1", False) == (204, 19, False)  # no body
    assert p(b"HTTP/1.1 200 OK\r\n\r\nabc", False) is None  # to the connection's end...
    assert p(b"HTTP/1.1 200 OK\r\n\r\nabc", True) == (200, 22, True)
    for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", b"HTTP/1.1 200"):
        with pytest.raises(ValueError):
            p(bad, True)  # cut by the connection's end
    with pytest.raises(ValueError):
        p(b"SSH-2.0-OpenSSH\r\n\r\n", False)


# the 2nd request on each connection: the connection closed without an answer
DROPS = (
    SERVER
    % """
def answer(t, n):
    if n == 2:
        t.close()
    else:
        later(0.01, t.write, b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n")
"""
)


def test_a_lost_connection_is_replaced_for_the_requests_waiting(monkeypatch):
    monkeypatch.setattr(lean, "POOL", 1)  # one connection: the others wait for it
    got = _run(DROPS, 0.05, 400, timeout=5.0)  # 20 requests, 2.5 ms apart, answered 10 ms later
    assert got["timed_out"] == 0  # none left waiting for a connection that never comes
    assert got["n"] + got["errors"] == 20 and got["n"] >= 5 and got["errors"] >= 5
    assert got["opened"] >= 5


# the 3rd request on a connection is never answered
SILENT = (
    SERVER
    % """
def answer(t, n):
    if n != 3:
        t.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n")
"""
)


def test_a_request_never_answered_is_an_error_at_its_deadline(monkeypatch):
    monkeypatch.setattr(lean, "POOL", 1)
    got = _run(SILENT, 0.1, 100, timeout=1.0)  # 10 requests
    # the 3rd holds the only connection: it and the 7 behind it time out, unanswered
    assert got["n"] == 2 and got["errors"] == 8 and got["timed_out"] == 8


def test_the_pool_of_connections_is_bounded(monkeypatch):
    monkeypatch.setattr(lean, "POOL", 2)
    slow = (
        SERVER
        % """
def answer(t, n):
    later(0.05, t.write, b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n")
"""
    )
    got = _run(slow, 0.1, 200)  # 20 requests, each answered after 50 ms
    assert got["opened"] == 2 and got["connections"] == 2
    assert got["n"] == 20 and got["errors"] == 0
    # requests waited for one of the two connections: the last ones' latency counts the wait
    assert max(got["lat"]) > 0.2


# -- the p50 target's judgement (gateway_report.py) ----------------------------------------------


def _open(p50: float, errors: int = 0, late: float = 0.1) -> dict:
    return {"p50_ms": p50, "errors": errors, "late_p99_ms": late, "n": 1000}


def test_the_p50_target_needs_no_errors_and_a_generator_on_schedule():
    g = load_benchmark("gateway_report")
    assert g.judge_p50(0.3, _open(0.4))["met"]
    assert not g.judge_p50(0.6, _open(0.4))["met"]  # the serial p50 counts too
    failed = g.judge_p50(0.3, _open(0.4, errors=1))
    assert failed["valid"] and not failed["met"] and "1 errors" in failed["why"]
    late = g.judge_p50(0.3, _open(0.4, late=g.LATE_BOUND_MS + 0.1))
    assert not late["valid"] and not late["met"] and "invalid" in late["why"]


def test_the_open_loops_rounds_are_pooled_over_their_successes():
    g = load_benchmark("gateway_load")
    rounds = [
        {"n": 2, "rps": 100.0, "errors": 1, "lat": [0.001, 0.003], "lat_intended": [0.002, 0.004],
         "late": [0.0, 0.001], "timed_out": 0, "opened": 2},
        {"n": 1, "rps": 50.0, "errors": 0, "lat": [0.002], "lat_intended": [0.002],
         "late": [0.0], "timed_out": 0, "opened": 3},
    ]  # fmt: skip
    f = g.figures(rounds)
    assert (f["n"], f["errors"], f["rps"], f["connections"]) == (3, 1, 75.0, 3)
    assert f["p50_ms"] == pytest.approx(2.0) and f["p50_intended_ms"] == pytest.approx(2.0)
    assert f["max_ms"] == pytest.approx(3.0)
    assert g.figures([{**rounds[1], "n": 0, "lat": [], "lat_intended": []}])["p50_ms"] == float(
        "inf"
    )  # nothing succeeded: no figure passes


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


def test_the_serial_p50_fails_on_any_answer_but_200():
    """A fast 429 must not pass for a fast invoke: the serial leg of the p50 target refuses."""
    g = load_benchmark("gateway_load")
    code = SERVER % (
        "def answer(t, n):\n"
        "    s = b'429 Too Many Requests' if n == 2 else b'200 OK'\n"
        "    t.write(b'HTTP/1.1 ' + s + b'\\r\\nContent-Length: 0\\r\\n\\r\\n')"
    )
    port = free_port()
    proc = _serve(code, port)
    try:
        assert g.serial_p50(f"http://127.0.0.1:{port}/x", 1) > 0  # one 200: measured
        with pytest.raises(RuntimeError, match=r"1 of 3 answers .* were not 200 \(first: 429\)"):
            g.serial_p50(f"http://127.0.0.1:{port}/x", 3)
    finally:
        proc.kill()
        proc.wait()
