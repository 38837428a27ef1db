"""Every error status the gateway promises, as JSON {error, detail}; and fuzzing: no 500s."""

from __future__ import annotations

import http.client
import json
import urllib.parse
import urllib.request

import msgpack
import pytest
from hearth.client import Client, ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

H = "hearth.functions.examples.handlers"


@pytest.fixture(scope="module")
def gw(hearth_auto):
    hearth_auto.deploy(name="echo", handler=f"{H}:echo", concurrency=8, max_instances=2)
    hearth_auto.deploy(name="secret", handler=f"{H}:hello", invoke_token="s3cret-invoke-token")
    hearth_auto.deploy(name="slowpoke", handler=f"{H}:sleep", timeout_s=5)
    return hearth_auto


def raw(gw, method, path, body=None, headers=None):
    req = urllib.request.Request(gw.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def err(gw, method, path, body=None, headers=None):
    status, data, hdrs = raw(gw, method, path, body, headers)
    assert hdrs.get("Content-Type", "").startswith("application/json"), (status, data)
    obj = json.loads(data)
    assert set(obj) == {"error", "detail"} and obj["detail"], obj
    return status, obj


def test_400_malformed_json_and_msgpack(gw):
    s, e = err(
        gw, "POST", "/v1/functions/echo:invoke", b"{not json", {"Content-Type": "application/json"}
    )
    assert s == 400 and e["error"] == "malformed_body" and "JSON" in e["detail"]
    s, e = err(
        gw,
        "POST",
        "/v1/functions/echo:invoke",
        b"\xc1\xc1",
        {"Content-Type": "application/msgpack"},
    )
    assert s == 400 and "msgpack" in e["detail"]
    ok = msgpack.packb({"a": 1})
    s, data, h = raw(
        gw, "POST", "/v1/functions/echo:invoke", ok, {"Content-Type": "application/msgpack"}
    )
    assert (
        s == 200
        and msgpack.unpackb(data) == {"a": 1}
        and h["Content-Type"] == "application/msgpack"
    )


def test_400_bad_spec_names_the_field(gw):
    auth = {"Authorization": f"Bearer {gw.client.token}", "Content-Type": "application/json"}

    def deploy(spec: dict | bytes) -> tuple[int, dict]:
        body = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        return err(gw, "POST", "/v1/functions", body, auth)

    s, e = deploy({"name": "Bad_Name", "handler": "x:y"})
    assert s == 400 and e["error"] == "invalid_spec" and "name" in e["detail"]
    s, e = deploy({"name": "ok", "handler": "no-colon"})
    assert s == 400 and "handler" in e["detail"]
    s, e = deploy({"name": "ok", "handler": "m:f", "min_instances": 5, "max_instances": 2})
    assert s == 400 and "min_instances" in e["detail"]
    s, e = deploy({"name": "ok", "handler": "m:f", "colour": "red"})
    assert s == 400 and "colour" in e["detail"]
    s, e = deploy(b"[1,2")
    assert s == 400 and e["error"] == "malformed_body"


def test_401_and_403_on_admin(gw):
    s, e = err(gw, "GET", "/v1/functions")
    assert s == 401 and e["error"] == "unauthorized"
    s, e = err(gw, "GET", "/v1/functions", headers={"Authorization": "Bearer wrong"})
    assert s == 403 and e["error"] == "forbidden"
    for path, method in (
        ("/v1/functions/echo", "DELETE"),
        ("/v1/status", "GET"),
        ("/v1/streams/x:publish", "POST"),
    ):
        assert err(gw, method, path)[0] == 401


def test_401_and_403_on_invoke_token(gw):
    assert err(gw, "POST", "/v1/functions/secret:invoke", b"{}")[0] == 401
    assert (
        err(gw, "POST", "/v1/functions/secret:invoke", b"{}", {"Authorization": "Bearer nope"})[0]
        == 403
    )
    r = gw.client.invoke("secret", b"{}", "application/json", token="s3cret-invoke-token")
    assert r.status == 200


def test_404_unknown_function_and_route(gw):
    # anonymous callers cannot tell an unknown name from a token-protected function
    s, e = err(gw, "POST", "/v1/functions/nope:invoke", b"{}")
    assert s == 401 and e["error"] == "unauthorized"
    s, e = err(
        gw,
        "POST",
        "/v1/functions/nope:invoke",
        b"{}",
        {"Authorization": "Bearer wrong-token-123456"},
    )
    assert s == 403
    s, e = err(
        gw,
        "POST",
        "/v1/functions/nope:invoke",
        b"{}",
        {"Authorization": f"Bearer {gw.client.token}"},
    )
    assert s == 404 and e["error"] == "unknown_function" and "nope" in e["detail"]
    assert err(gw, "GET", "/v2/whatever")[0] == 404
    assert err(gw, "GET", "/v1/invocations/does-not-exist")[0] == 404


def _used(gw) -> int:
    return gw.client.status()["pool"]["used"]


def test_413_payload_too_large(gw):
    before = _used(gw)
    s, e = err(
        gw,
        "POST",
        "/v1/functions/echo:invoke",
        b"x" * (1024 * 1024 + 1),
        {"Content-Type": "application/octet-stream"},
    )
    assert s == 413 and e["error"] == "payload_too_large"
    # the gateway keeps serving and lost nothing: the slot went back to the pool
    assert gw.client.invoke("echo", b"still fine").body == b"still fine"
    assert _used(gw) <= before  # nothing held on to a slot (reclaims elsewhere may lower it)


def chunked(gw, path, chunks, headers=None):
    """POST with Transfer-Encoding: chunked (no Content-Length): the body is streamed."""
    u = urllib.parse.urlsplit(gw.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        c.request("POST", path, body=iter(chunks), headers=headers or {}, encode_chunked=True)
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def test_chunked_bodies_are_read_whole_and_bounded(gw):
    chunks = [b"a" * 10, b"", b"b" * 70_000, b"c"]  # an empty chunk inside is not the end
    s, data, _ = chunked(gw, "/v1/functions/echo:invoke", [c for c in chunks if c])
    assert s == 200 and data == b"".join(chunks)
    before = _used(gw)
    s, data, hdrs = chunked(gw, "/v1/functions/echo:invoke", [b"x" * 65536] * 17)  # > 1 MiB
    assert s == 413 and hdrs["Content-Type"].startswith("application/json")
    assert json.loads(data)["error"] == "payload_too_large"
    assert gw.client.invoke("echo", b"still fine").body == b"still fine"
    assert _used(gw) <= before


def test_504_timeout_param(gw):
    s, e = err(
        gw,
        "POST",
        "/v1/functions/slowpoke:invoke?timeout=0.5",
        b'{"seconds": 3}',
        {"Content-Type": "application/json"},
    )
    assert s == 504 and e["error"] == "timeout"
    s, e = err(
        gw,
        "POST",
        "/v1/functions/slowpoke:invoke?timeout=abc",
        b"{}",
        {"Content-Type": "application/json"},
    )
    assert s == 400
    before = _used(gw)
    for _ in range(5):  # a rejected request must not keep the slot its body was read into
        assert err(gw, "POST", "/v1/functions/slowpoke:invoke?timeout=-1", b"x" * 1000)[0] == 400
    assert _used(gw) <= before  # rejected requests added no slot use


def test_405_wrong_method(gw):
    assert err(gw, "GET", "/v1/functions/echo:invoke")[0] == 405


def test_openapi_served_and_kept_in_repo(gw):
    from pathlib import Path

    served = json.loads(raw(gw, "GET", "/openapi.json")[1])
    kept = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    assert served == kept, "regenerate docs/openapi.json: hearth openapi > docs/openapi.json"
    assert "/v1/functions/{name}:invoke" in served["paths"]


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
CTYPES = st.sampled_from(
    [
        "application/json",
        "application/msgpack",
        "application/octet-stream",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "",
        "garbage/\x7f",
    ]
)


def send_raw(gw, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes):
    """One HTTP/1.1 request written byte for byte on a socket (nothing validated or refused on
    the client side, so every fuzzed input reaches the server); returns (status, body)."""
    import socket

    u = urllib.parse.urlsplit(gw.url)
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: {u.netloc}".encode()]
    head += [f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1."), data[:200]  # the server answered, always
    hdrs, _, payload = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in hdrs.lower():
        out, i = b"", 0
        while True:
            j = payload.index(b"\r\n", i)
            n = int(payload[i:j].split(b";")[0], 16)
            if n == 0:
                break
            out += payload[j + 2 : j + 2 + n]
            i = j + 2 + n + 2
        payload = out
    return int(status_line.split()[1]), payload


@FUZZ
@given(body=st.binary(max_size=4096), ctype=CTYPES)
def test_fuzz_invoke_never_500(gw, body, ctype):
    headers = [(b"Content-Type", ctype.encode())] if ctype else []
    status, data = send_raw(gw, "POST", "/v1/functions/echo:invoke", headers, body)
    assert status < 500, (status, data[:200])
    if status == 200:
        assert data == body  # echoed unchanged


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=2048),
        st.dictionaries(
            st.text(max_size=12),
            st.one_of(st.integers(), st.text(max_size=20), st.none()),
            max_size=6,
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_fuzz_admin_deploy_never_500(gw, body):
    status, data, _ = raw(
        gw,
        "POST",
        "/v1/functions",
        body,
        {"Authorization": f"Bearer {gw.client.token}", "Content-Type": "application/json"},
    )
    assert status in (400, 200, 201), (status, data[:300])


@FUZZ
@given(name=st.text(min_size=1, max_size=30), value=st.text(max_size=200))
def test_fuzz_headers_never_500(gw, name, value):
    """Any header name and value, sent as their UTF-8 bytes (even ones no HTTP client would
    send: control characters, colons, line breaks): the gateway answers, never with a 5xx."""
    status, data = send_raw(
        gw, "POST", "/v1/functions/echo:invoke", [(name.encode(), value.encode())], b"x"
    )
    assert status < 500, (status, data[:200])


def test_huge_headers_rejected_cleanly_and_gateway_healthy(gw):
    status, _, _ = raw(gw, "POST", "/v1/functions/echo:invoke", b"x", {"X-Big": "a" * 20000})
    assert 400 <= status < 500
    assert Client(gw.url).request("GET", "/healthz").json()["status"] == "ok"


def test_gateway_healthy_after_fuzzing(gw):
    assert Client(gw.url).request("GET", "/healthz").json()["status"] == "ok"
    assert gw.client.invoke("echo", b"ok").body == b"ok"
    with pytest.raises(ClientError):
        gw.client.invoke("nope", b"")


def test_publish_route_statuses_and_queue_metrics(gw):
    auth = {
        "Authorization": f"Bearer {gw.client.token}",
        "Content-Type": "application/octet-stream",
    }
    s, data, _ = raw(gw, "POST", "/v1/streams/orders:publish", b"an event", auth)
    assert s == 201 and json.loads(data)["id"]
    s, e = err(gw, "POST", "/v1/streams/orders:publish", b"x" * ((1 << 20) + 1), auth)
    assert s == 413
    s, e = err(gw, "POST", "/v1/streams/bad%20name:publish", b"x", auth)
    assert s in (400, 404)
    gw.deploy(
        name="stream-fn",
        handler=f"{H}:noop",
        triggers=[{"type": "redis-stream", "stream": "orders"}],
    )
    assert raw(gw, "GET", "/metrics")[0] == 401  # scrapers need a token
    metrics = raw(gw, "GET", "/metrics", None, auth)[1].decode()
    assert "hearth_queue_length" in metrics and 'stream="orders"' in metrics


@FUZZ
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=700), max_size=8),
    ctype=st.sampled_from(["application/octet-stream", "application/json", "application/msgpack"]),
)
def test_fuzz_chunked_invoke_never_500(gw, chunks, ctype):
    s, data, _ = chunked(gw, "/v1/functions/echo:invoke", chunks, {"Content-Type": ctype})
    assert s < 500, (s, data[:200])
    if s == 200:
        assert data == b"".join(chunks)
    else:
        assert s == 400 and json.loads(data)["error"] == "malformed_body"
