"""The node gateway's lean HTTP path for the warm invoke (`hearth.gateway.fastpath`).

Through a real `hearth up`, with raw sockets: a simple invoke is answered on the fast path (the
`hearth_gateway_fast_path` counter proves which requests it took) exactly as aiohttp's handler
answers the same request sent with a `Prefer` header (which the fast path hands to aiohttp):
200s with their headers, the token rules, 413, 400, 429. Keep-alive, a connection that turns to
another route, a head split over several reads, pipelining, and slow heads and bodies (which go to
aiohttp's deadlines and limits). The 503 of loop-lag shedding is checked in process, with the
gateway's loop held back on purpose."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_in_process import gateway_in_process
from hearth.gateway.httphead import MAX_HEAD, MORE, OTHER, Request, parse_head
from hearth.localnode import LocalNode, start_node

HERE = Path(__file__).parent
TOKEN = "fastpath-admin-token-0123456789"
FN_TOKEN = "fn-token-42"
LIMIT = 4096  # HEARTH_MAX_BODY_BYTES of the node under test
SLOW = {"Prefer": "return=minimal"}  # sends an otherwise identical request through aiohttp


# -- the request recogniser (pure) -------------------------------------------------------------


def _head(*lines: str, body: bytes = b"", first: str = "") -> bytes:
    first = first or "POST /v1/functions/f:invoke HTTP/1.1"
    if not any(line.lower().startswith("host:") for line in lines):
        lines = ("Host: h", *lines)
    return ("\r\n".join([first, *lines]) + "\r\n\r\n").encode("latin-1") + body


def test_parse_takes_only_the_simple_invoke_and_leaves_the_rest_to_aiohttp():
    req = parse_head(_head("Host: x", "Content-Length: 2", "X-A:  v \t", body=b"{}POST"))
    assert isinstance(req, Request)
    assert (req.name, req.body, req.headers["x-a"], req.headers["Content-Length"]) == (
        "f",
        b"{}",
        "v",
        "2",
    )
    assert req.end == len(_head("Host: x", "Content-Length: 2", "X-A:  v \t")) + 2  # pipelined
    assert not req.close and parse_head(_head("Content-Length: 0", "Connection: close")).close
    assert parse_head(b"POST /v1/functions/f:inv") is MORE  # a head not all here yet
    assert parse_head(_head("Content-Length: 0")[:-2]) is MORE
    assert parse_head(b"GET /healthz HTTP/1.1\r\n") is OTHER  # known at once not to be ours
    pending = parse_head(_head("Content-Length: 3", body=b"ab"))  # the body on its way
    assert isinstance(pending, Request) and (pending.length, pending.body) == (3, None)
    assert pending.end == len(_head("Content-Length: 3"))  # the head only
    others = [
        _head("Content-Length: 99999999"),  # larger than the small-body case
        _head("Host: x"),  # no Content-Length
        _head("Content-Length: 1", "Content-Length: 1", body=b"a"),  # repeated
        _head("Content-Length: -1"),
        _head("Content-Length: 0", "Transfer-Encoding: chunked"),
        _head("Content-Length: 0", "Expect: 100-continue"),
        _head("Content-Length: 0", "Upgrade: websocket"),
        _head("Content-Length: 0", "Connection: upgrade"),
        _head("Content-Length: 0", "Prefer: respond-async"),
        _head("Content-Length: 0", "Bad Name: x"),
        _head("Content-Length: 0", "X: a\x01b"),
        _head("Content-Length: 0", "no colon"),
        _head("Content-Length: 0", first="POST /v1/functions/f:invoke HTTP/1.0"),
        _head("Content-Length: 0", first="POST /v1/functions/f:invoke?async=1 HTTP/1.1"),
        _head("Content-Length: 0", first="POST /v1/functions/F:invoke HTTP/1.1"),
        _head("Content-Length: 0", first="POST /v1/functions HTTP/1.1"),
        _head("Content-Length: 0", "X: " + "a" * MAX_HEAD),  # past the head limit
        b"POST /v1/functions/f:invoke HTTP/1.1\r\nX: " + b"a" * MAX_HEAD,  # never ending
        b"POST /v1/functions/f:invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # no Host
        _head("Host: x", "Content-Length: 0", "Host: y"),  # two
        b"POST /v1/functions/f:invoke HTTP/1.1\nHost: h\nContent-Length: 0\n\n",  # bare LF
        b"POST /v1/functions/f:invoke HTTP/1.1\r\nHost: h\n",  # one so far
        _head("Content-Length: 0", "X: a\rb"),
        _head("Content-Length: 0", "X: a\x00b"),
        _head("Content-Length: 0", " X: folded"),  # obs-fold
        _head("Content-Length: 0", "X: a", "\tfolded"),
        _head("Content-Length : 0"),  # whitespace before the colon
        _head("Content-Length: 0", "transfer-encoding: Chunked"),
        _head("Content-Length: 0", "Content-length: 0"),
        _head("Content-Length: 0", "Connection: close, keep-alive"),
        _head("Content-Length: 0", first="POST http://h/v1/functions/f:invoke HTTP/1.1"),
        _head("Content-Length: 0", first="POST /v1/functions/%66:invoke HTTP/1.1"),
    ]
    for raw in others:
        assert parse_head(raw) is OTHER, raw[:120]
    for raw in others:  # asked again (a parsed head is kept): the same answers
        assert parse_head(raw) is OTHER, raw[:120]


def test_a_head_seen_before_parses_the_same_and_each_request_gets_its_own_headers():
    """Parsed heads are kept (a keep-alive client repeats its head), but every request gets its
    own header map and body, and the kept heads are bounded."""
    from hearth.gateway import httphead

    raw = _head("Host: x", "Content-Length: 2", "X-A: v")
    first = parse_head(raw + b"{}")
    again = parse_head(raw + b"[]" + raw)
    assert isinstance(first, Request) and isinstance(again, Request)
    assert (first.name, first.body, again.body) == ("f", b"{}", b"[]")
    assert (again.end, again.length, again.close) == (first.end, 2, False)
    first.headers["X-A"] = "changed by its caller"
    assert again.headers["x-a"] == "v" and again.headers is not first.headers
    assert parse_head(raw + b"[") is not first  # and the body can still be on its way
    assert parse_head(raw + b"[").body is None
    for i in range(httphead.PARSED_MAX * 2):
        assert isinstance(parse_head(_head("Host: x", "Content-Length: 0", f"X-N: {i}")), Request)
    assert len(httphead._PARSED) <= httphead.PARSED_MAX


# -- through a real node -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(redis_server, tmp_path_factory) -> Iterator[LocalNode]:
    n = start_node(
        tmp_path_factory.mktemp("fastpath"),
        redis_url=redis_server.url,
        token=TOKEN,
        dataplane="unix",
        env={"HEARTH_MAX_BODY_BYTES": str(LIMIT), "HEARTH_BODY_GRACE_S": "1"},
    )
    try:
        common = {"code_path": str(HERE)}
        n.client.deploy({"name": "reply", "handler": "fastpath_handlers:reply", **common})
        n.client.deploy(
            {
                "name": "locked",
                "handler": "fastpath_handlers:reply",
                "invoke_token": FN_TOKEN,
                **common,
            }
        )
        n.client.deploy(
            {
                "name": "nap",
                "handler": "fastpath_handlers:nap",
                "concurrency": 1,
                "max_instances": 1,
                "queue_size": 0,
                **common,
            }
        )
        n.client.deploy(
            {"name": "nap4", "handler": "fastpath_handlers:nap", "concurrency": 4, **common}
        )
        n.client.deploy({"name": "status", "handler": "fastpath_handlers:status", **common})
        n.client.deploy({"name": "victim", "handler": "hearth.functions.examples.handlers:sleep"})
        n.client.request("POST", "/v1/functions/reply:invoke", b"", ok=(201,))  # warm
        n.client.invoke("nap4", b"0")
        n.client.invoke("nap", b"0")
        n.client.request("POST", "/v1/functions/locked:invoke", b"", token=FN_TOKEN, ok=(201,))
        yield n
    finally:
        n.stop()


def _conn(node: LocalNode) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", int(node.url.rsplit(":", 1)[1])), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class _Reader:
    """Responses read off one connection, in order."""

    def __init__(self, s: socket.socket) -> None:
        self.s, self.buf = s, b""

    def _fill(self) -> None:
        chunk = self.s.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buf += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            assert k.lower() not in headers, f"header {k} sent twice"
            headers[k.lower()] = v.strip()
        status = int(lines[0].split()[1])
        n = 0 if status in (204, 304) else int(headers["content-length"])
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body


def _invoke(name: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"POST /v1/functions/{name}:invoke HTTP/1.1", "Host: test"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _ask(node: LocalNode, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with _conn(node) as s:
        s.sendall(raw)
        return _Reader(s).response()


def _fast_count(node: LocalNode, which: str = "fast_path") -> float:
    text = node.client.request("GET", "/metrics", admin=True).body.decode()
    for line in text.splitlines():
        if line.startswith(f"hearth_gateway_{which}_total "):
            return float(line.split()[1])
    raise AssertionError(f"no hearth_gateway_{which}_total on /metrics")


def _direct_count(node: LocalNode) -> float:
    """Fast-path calls started from the read itself, with no task (a free warm instance)."""
    return _fast_count(node, "fast_path_direct")


def _both(node: LocalNode, name: str, body: bytes = b"", direct: int = 0, **headers: str):
    """The same request on the fast path and (with a Prefer header) through aiohttp; checks
    that the first, and only the first, took the fast path, and `direct` of it started from
    the read (a warm call every rule lets through) rather than in a task."""
    before, before_direct = _fast_count(node), _direct_count(node)
    fast = _ask(node, _invoke(name, body, **headers))
    slow = _ask(node, _invoke(name, body, **headers, **SLOW))
    assert _fast_count(node) == before + 1
    assert _direct_count(node) == before_direct + direct
    return fast, slow


def _error(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str, str | None, str | None]:
    status, headers, body = answer
    assert headers["content-type"] == "application/json; charset=utf-8"
    doc = json.loads(body)
    assert set(doc) == {"error", "detail"} and doc["detail"]
    return status, doc["error"], headers.get("retry-after"), headers.get("www-authenticate")


def test_a_200_and_its_headers_are_the_same_on_both_paths(node):
    fast, slow = _both(
        node,
        "reply",
        b'{"a": 1}',
        direct=1,
        Content_Type="application/json",
        X_Custom="v",
        Cookie="c=1",
    )
    for status, headers, body in (fast, slow):
        assert status == 201
        assert headers["content-type"] == "application/json"
        assert headers["x-reply"] == "yes"
        assert "connection" not in headers and "x-split" not in headers  # dropped, both paths
        assert "injected" not in headers
        assert headers["x-hearth-node"] and headers["x-hearth-cold"] == "0"
        assert headers["x-hearth-instance"].startswith("reply-")
        assert float(headers["x-hearth-duration"]) >= 0
        assert int(headers["content-length"]) == len(body)
        assert headers["date"] and headers["server"] == "fn/1"  # (the reader checks: once)
    assert fast[1]["x-hearth-invocation"] != slow[1]["x-hearth-invocation"]
    seen_fast, seen_slow = json.loads(fast[2]), json.loads(slow[2])
    assert seen_fast["body"] == seen_slow["body"] == '{"a": 1}'
    assert seen_slow["headers"].pop("prefer") == "return=minimal"
    assert seen_fast["headers"] == seen_slow["headers"]
    assert seen_fast["headers"]["x-custom"] == "v"
    assert "cookie" not in seen_fast["headers"] and "host" not in seen_fast["headers"]


@pytest.mark.parametrize(
    ("name", "token", "want"),
    [
        ("locked", None, (401, "unauthorized", None, "Bearer")),
        ("locked", "wrong", (403, "forbidden", None, None)),
        ("nosuch", None, (401, "unauthorized", None, "Bearer")),  # unknown looks protected
        ("nosuch", "wrong", (403, "forbidden", None, None)),
        ("nosuch", TOKEN, (404, "unknown_function", None, None)),  # the admin may learn it
    ],
)
def test_the_token_rules_are_the_same_on_both_paths(node, name, token, want):
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    fast, slow = _both(node, name, b"", **auth)
    assert _error(fast) == _error(slow) == want


def test_the_right_invoke_token_is_served_on_the_fast_path(node):
    fast, slow = _both(node, "locked", b"x", direct=1, Authorization=f"Bearer {FN_TOKEN}")
    assert fast[0] == slow[0] == 201


def test_too_large_and_malformed_bodies_are_refused_alike(node):
    big = b"x" * (LIMIT + 1)
    fast, slow = _both(node, "reply", big)
    assert _error(fast) == _error(slow) == (413, "payload_too_large", None, None)
    fast, slow = _both(node, "reply", b'{"a": ', Content_Type="application/json")
    assert _error(fast) == _error(slow) == (400, "malformed_body", None, None)
    assert json.loads(fast[2])["detail"] == json.loads(slow[2])["detail"]


def test_a_function_at_its_limit_gets_429_on_both_paths(node):
    held = threading.Thread(target=node.client.invoke, args=("nap", b"3"))
    held.start()
    try:
        for _ in range(200):  # until the call holds the only instance
            inst = node.client.status()["functions"]["nap"]["instances"]
            if any(i["inflight"] for i in inst):
                break
            time.sleep(0.02)
        fast, slow = _both(node, "nap", b"0")
        assert _error(fast) == _error(slow) == (429, "overloaded", "1", None)
    finally:
        held.join(30)


def test_a_call_started_from_the_read_whose_instance_dies_is_a_502_and_the_connection_goes_on(
    node,
):
    """The direct path's errors are answered as the task's: an instance killed mid-call gives
    502 `instance_died` as JSON, its slot goes back to the pool, and the connection serves the
    next call (on a new instance)."""
    used = node.client.status()["pool"]["used"]
    sleep = {"Content_Type": "application/json"}
    with _conn(node) as s:
        r = _Reader(s)
        s.sendall(_invoke("victim", b'{"seconds": 0}', **sleep))
        status, _, body = r.response()
        pid = json.loads(body)["pid"]
        direct = _direct_count(node)
        s.sendall(_invoke("victim", b'{"seconds": 20}', **sleep))
        deadline = time.monotonic() + 20
        while _direct_count(node) == direct and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # in the handler
        os.kill(pid, signal.SIGKILL)
        assert _error(r.response()) == (502, "instance_died", None, None)
        s.sendall(_invoke("victim", b'{"seconds": 0}', **sleep))
        status, _, body = r.response()
        assert status == 200 and json.loads(body)["pid"] != pid
    assert _direct_count(node) == direct + 1  # the second was a cold start: a task's
    deadline = time.monotonic() + 20
    while node.client.status()["pool"]["used"] > used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.client.status()["pool"]["used"] <= used


def test_a_function_cannot_forge_the_next_response_on_either_path(node):
    """A 204 or 304 has no body, and a 1xx is no final answer: a client reads whatever follows
    as the next response. A function answering one with a whole response as its body: 204/304
    go out without it, 1xx is a 502, and the next call on the connection gets its own answer."""
    before = _fast_count(node)
    for extra in ({}, SLOW):
        with _conn(node) as s:
            r = _Reader(s)
            for code, want in (("204", 204), ("304", 304), ("101", 502), ("600", 502)):
                s.sendall(_invoke("status", code.encode(), **extra) + _invoke("reply", b"next"))
                status, headers, body = r.response()
                assert status == want and "x-forged" not in headers, (code, extra, headers)
                if want == 502:
                    assert _error((status, headers, body))[1] == "bad_reply"
                else:
                    assert "content-length" not in headers
                status, headers, body = r.response()
                assert status == 201 and json.loads(body)["body"] == "next", (code, extra)
    assert _fast_count(node) == before + 8


def test_a_reply_http_cannot_carry_is_a_502_on_both_paths_and_the_call_ends(node):
    """A function answering a content type that is not text: the call started from the read
    answers as aiohttp's path does (502 bad_reply, not no answer at all), and ends (its
    connection serves the next request; the node's count of calls in flight goes down)."""
    node.client.deploy(
        {"name": "odd", "handler": "fastpath_handlers:odd_type", "code_path": str(HERE)}
    )
    node.client.request("POST", "/v1/functions/odd:invoke", b"", ok=(502,))  # warm
    fast, slow = _both(node, "odd", b"x", direct=1)
    assert _error(fast)[:2] == _error(slow)[:2] == (502, "bad_reply")
    with _conn(node) as s:
        r = _Reader(s)
        s.sendall(_invoke("odd", b"x") + _invoke("reply", b"next"))
        assert r.response()[0] == 502
        status, _, body = r.response()
        assert status == 201 and json.loads(body)["body"] == "next", (status, body)


def test_heads_the_fast_path_does_not_take_get_aiohttp_answer_at_once(node):
    """A head whose lines end in a bare LF never ends in CRLF CRLF: it is aiohttp's to judge at
    once (it used to wait for a head end that never came); a head without Host is aiohttp's
    400 (HTTP/1.1 needs one), not served."""
    before = _fast_count(node)
    for extra in ("", "Prefer: x\n"):
        bare = f"POST /v1/functions/reply:invoke HTTP/1.1\nHost: h\n{extra}Content-Length: 0\n\n"
        with _conn(node) as s:
            s.settimeout(10)
            s.sendall(bare.encode())
            first = s.recv(200)
        assert first.startswith(b"HTTP/1.1 ") or first.startswith(b"HTTP/1.0 "), first
    raw = b"POST /v1/functions/reply:invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    with _conn(node) as s:
        s.sendall(raw)
        assert int(s.recv(200).split()[1]) == 400
    assert _fast_count(node) == before


def test_keep_alive_then_another_route_on_the_same_connection(node):
    before = _fast_count(node)
    with _conn(node) as s:
        r = _Reader(s)
        ids = set()
        for k in range(3):
            s.sendall(_invoke("reply", str(k).encode()))
            status, headers, body = r.response()
            assert status == 201 and json.loads(body)["body"] == str(k)
            ids.add(headers["x-hearth-invocation"])
        assert len(ids) == 3
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")  # aiohttp's from here on
        status, _, body = r.response()
        assert status == 200 and json.loads(body)["status"] == "ok"
        s.sendall(_invoke("reply", b"after"))
        status, _, body = r.response()
        assert status == 201 and json.loads(body)["body"] == "after"
    assert _fast_count(node) == before + 3


def test_a_last_request_closes_its_connection_on_both_paths(node):
    """`Connection: close` (urllib and the hearth client send it): answered, then closed."""
    before = _fast_count(node)
    for extra in ({}, SLOW):
        with _conn(node) as s:
            s.sendall(_invoke("reply", b"last", Connection="close", **extra))
            r = _Reader(s)
            status, headers, body = r.response()
            assert (status, headers["connection"], json.loads(body)["body"]) == (
                201,
                "close",
                "last",
            )
            assert r.buf == b"" and s.recv(100) == b""  # closed by the server
    # the hearth client (urllib: Connection: close; a body would be sent in a second write,
    # which makes it aiohttp's: see the split-body case below)
    assert node.client.invoke("nap4", b"").json() == {"slept": 0.0}
    assert _fast_count(node) == before + 2


def test_a_head_split_over_several_reads_and_pipelined_requests(node):
    """A head that arrives in pieces, and a body that comes after its head (http.client sends
    it in a second write), are the fast path's; pipelined requests are answered in order."""
    before, before_direct = _fast_count(node), _direct_count(node)
    raw = _invoke("reply", b"split", Content_Type="text/plain")
    with _conn(node) as s:
        r = _Reader(s)
        for piece in (raw[:9], raw[9:40], raw[40:-10], raw[-10:]):  # the body in the last piece
            s.sendall(piece)
            time.sleep(0.05)  # separate reads on the gateway's side
        status, _, body = r.response()
        assert status == 201 and json.loads(body)["body"] == "split"
        s.sendall(_invoke("reply", b"one") + _invoke("reply", b"two") + _invoke("nosuch"))
        got = [r.response() for _ in range(3)]
        # one read behind another: the second waits for the first's answer
        s.sendall(_invoke("nap4", b"0.3"))
        time.sleep(0.1)
        s.sendall(_invoke("reply", b"three"))
        got += [r.response() for _ in range(2)]
    assert [g[0] for g in got] == [201, 201, 401, 200, 201]  # in request order
    assert [json.loads(g[2])["body"] for g in got[:2]] == ["one", "two"]
    assert json.loads(got[3][2]) == {"slept": 0.3} and json.loads(got[4][2])["body"] == "three"
    assert _fast_count(node) == before + 6
    # all but the unknown name (answered 401 by the task) were started with no task: from the
    # read that completed them, or from the answer before them (pipelined)
    assert _direct_count(node) == before_direct + 5
    # handed to aiohttp while a fast call is served: its answer comes after the fast one's
    with _conn(node) as s:
        r = _Reader(s)
        s.sendall(_invoke("nap4", b"0.3") + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        (st1, _, b1), (st2, _, b2) = r.response(), r.response()
        assert (st1, json.loads(b1), st2) == (200, {"slept": 0.3}, 200), b2
    assert _fast_count(node) == before + 7
    with _conn(node) as s:
        s.sendall(raw[:-3])
        time.sleep(0.05)
        s.sendall(raw[-3:])
        status, _, body = _Reader(s).response()
        assert status == 201 and json.loads(body)["body"] == "split"
    assert _fast_count(node) == before + 8
    # its body after its head: started once the body is in, as one that came with it (#19),
    # not through `checked` and `call` (the split request above had its body in its last read)
    assert _direct_count(node) == before_direct + 7


def test_slow_heads_and_bodies_meet_the_gateway_limits(node):
    """A body that does not come with its head has the deadline of aiohttp's path (408, grace
    1 s here), on both paths; a head that trickles past the head limit gets aiohttp's 4xx.
    Meanwhile other calls are served."""
    with _conn(node) as slow_body, _conn(node) as slow_head:
        slow_body.sendall(_invoke("reply", b"x" * 100)[:-90])  # 10 of 100 body bytes
        slow_head.sendall(b"POST /v1/functions/reply:invoke HTTP/1.1\r\nX-Long: ")
        for _ in range(10):
            slow_head.sendall(b"a" * 1000)
            time.sleep(0.02)
        assert _ask(node, _invoke("reply", b"ok"))[0] == 201
        status, _, body = _Reader(slow_body).response()
        assert (status, json.loads(body)["error"]) == (408, "request_timeout")
        with _conn(node) as slow_aiohttp:
            slow_aiohttp.sendall(_invoke("reply", b"x" * 100, **SLOW)[:-90])
            status, _, body = _Reader(slow_aiohttp).response()
            assert (status, json.loads(body)["error"]) == (408, "request_timeout")
        status = int(slow_head.recv(200).split()[1])  # answered once past the limit, and closed
        assert status in (400, 431)


def test_a_call_refused_before_its_body_is_answered_at_once_and_closed(node):
    """Token rules and admission come before the body, as on aiohttp's path: a call without its
    token is answered 401 while its body is still on its way, and its connection is closed (the
    body's bytes must not be read as a request)."""
    with _conn(node) as s:
        s.sendall(_invoke("locked", b"y" * 1000)[:-900])
        r = _Reader(s)
        status, headers, body = r.response()
        assert (status, json.loads(body)["error"], headers["connection"]) == (
            401,
            "unauthorized",
            "close",
        )
        assert r.buf == b"" and s.recv(100) == b""


# -- loop-lag shedding, in process -------------------------------------------------------------


async def test_while_the_node_sheds_the_fast_path_answers_503_from_the_read(tmp_path, redis_url):
    """The node gateway as `hearth up` serves it (`make_app`, `listen`), with loop-lag shedding
    at 20 ms and its loop held back 100 ms per turn: an invoke is answered 503 `overloaded` +
    Retry-After on the fast path as through aiohttp's middleware, each counted as shed; once
    the loop is on time again the same invoke is judged by the route (404 to the admin)."""
    import asyncio

    import aiohttp
    from hearth.gateway.shed import LOOP_LAG

    async with gateway_in_process(tmp_path, redis_url, app_kw={"shed_lag_s": 0.02}) as gw:
        invoke = f"{gw.url}/v1/functions/nosuch:invoke"
        lag = gw.app[LOOP_LAG]
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0k"}) as s:
            gw.slow()
            await asyncio.sleep(0.5)  # several late ticks: sustained lag
            answers = []
            for extra in ({}, SLOW):
                async with s.post(invoke, data=b"{}", headers=extra) as resp:
                    answers.append(
                        (resp.status, (await resp.json())["error"], resp.headers["Retry-After"])
                    )
            assert answers == [(503, "overloaded", "1")] * 2
            assert lag.state.shed == 2
            assert gw.agent.metrics.fast_path.n == 1  # the first one only
            gw.fast()
            await asyncio.sleep(0.3)  # on-time ticks again
            async with s.post(invoke, data=b"{}") as resp:
                assert resp.status == 404
        assert gw.agent.metrics.rejected.labels("overloaded")._value.get() == 2


async def test_aiohttp_idle_timer_still_closes_idle_connections_not_busy_ones(tmp_path, redis_url):
    """Idle connections keep aiohttp's bound (`keepalive_timeout`, 0.4 s here): one that asks
    on the fast path every 0.15 s stays open past it (the timer counts from the last answer),
    and is closed once it stays idle longer."""
    import asyncio

    async with gateway_in_process(tmp_path, redis_url, runner_kw={"keepalive_timeout": 0.4}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        ask = _invoke("nosuch", Authorization="Bearer t0k")
        for _ in range(8):  # 1.2 s of calls, three times the idle bound
            writer.write(ask)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 404 ")
            n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(n)
            await asyncio.sleep(0.15)
        assert gw.agent.metrics.fast_path.n == 8
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # idle: closed
        writer.close()


async def test_refusals_to_a_client_that_stopped_reading_resume_its_reads(tmp_path, redis_url):
    """A client that does not read its answers (the transport pauses writing) while it pipelines
    past `PIPELINE_MAX` has its reads paused; once it reads again, every request it sent is
    answered, the shed 503s included (reads used to stay paused when only refusals were sent)."""
    import asyncio

    from hearth.gateway.fastpath import PIPELINE_MAX
    from hearth.gateway.sojourn import TAP

    taps = []

    def keep_taps(app) -> None:
        tap = app[TAP]
        app[TAP] = lambda inner, stamps: taps.append(tap(inner, stamps)) or taps[-1]

    async with gateway_in_process(
        tmp_path, redis_url, app_kw={"shed_lag_s": 0.02}, before_serving=keep_taps
    ) as gw:
        gw.slow()
        await asyncio.sleep(0.5)  # sustained lag: invokes are shed
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        while not taps:
            await asyncio.sleep(0.01)
        taps[0].pause_writing()  # what the transport does when the client does not read
        ask = _invoke("nosuch", Authorization="Bearer t0k")
        first = PIPELINE_MAX // len(ask) + 10
        writer.write(ask * first)  # past the limit: read, then reads pause
        await asyncio.sleep(0.5)
        writer.write(ask * 100)  # left in the socket buffers meanwhile
        await asyncio.sleep(0.3)
        n = first + 100
        taps[0].resume_writing()  # the client reads again
        got, deadline = b"", time.monotonic() + 20
        while got.count(b"HTTP/1.1 ") < n and time.monotonic() < deadline:
            got += await asyncio.wait_for(reader.read(1 << 20), 20)
        assert got.count(b"HTTP/1.1 503 ") == got.count(b"HTTP/1.1 ") == n
        writer.close()


async def test_a_thousand_pipelined_requests_that_all_hit_a_bug_are_each_answered(
    tmp_path, redis_url, monkeypatch
):
    """A bug in the task-free start (here: `InvokeRoute.start` raising) is answered 500 at once
    and the next pipelined request is read: 1,000 of them on one connection get 1,000 answers,
    the connection stays usable (answering each one used to call back into the reader, once per
    request: past Python's recursion limit the rest of the connection was lost)."""
    import asyncio

    from hearth.gateway.route import InvokeRoute

    def broken(self, *a, **kw):
        raise RuntimeError("a bug in the start")

    monkeypatch.setattr(InvokeRoute, "start", broken)
    async with gateway_in_process(tmp_path, redis_url) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        n = 1000
        writer.write(_invoke("nosuch", b"{}", Authorization="Bearer t0k") * n)
        got, deadline = b"", time.monotonic() + 30
        while got.count(b"HTTP/1.1 ") < n and time.monotonic() < deadline:
            more = await asyncio.wait_for(reader.read(1 << 20), 30)
            if not more:
                break
            got += more
        assert got.count(b"HTTP/1.1 500 ") == got.count(b"HTTP/1.1 ") == n
        assert got.count(b'"internal_error"') == n
        monkeypatch.undo()  # the same connection still serves: 404 from the route
        writer.write(_invoke("nosuch", b"{}", Authorization="Bearer t0k"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 404 "), head
        writer.close()
