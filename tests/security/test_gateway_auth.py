"""Low findings at the gateway: bad Authorization bytes, deep deploy bodies, name enumeration,
/metrics, the reserved stream prefix, unusable admin tokens."""

from __future__ import annotations

import http.client
import json

import pytest
from hearth.config import Settings, TokenError
from sec_helpers import TOKEN, deploy


def _raw(node, method, path, body=b"", headers=None) -> tuple[int, dict, bytes]:
    port = int(node.url.rsplit(":", 1)[1])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.putrequest(method, path)
        for k, v in (headers or {}).items():
            c.putheader(k, v)  # bytes values go out as they are
        c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_non_utf8_authorization_is_a_clean_403(private_node):
    deploy(private_node, "guarded", "size", invoke_token="guarded-invoke-token")
    for path, method in (("/v1/status", "GET"), ("/v1/functions/guarded:invoke", "POST")):
        s, _, body = _raw(private_node, method, path, headers={"Authorization": b"Bearer \xff\xfe"})
        assert s == 403, body
        assert set(json.loads(body)) == {"error", "detail"}


def test_deeply_nested_deploy_body_is_a_400(private_node):
    deep = b"[" * 100_000 + b"]" * 100_000
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    s, _, body = _raw(private_node, "POST", "/v1/functions", deep, auth)
    assert s == 400 and json.loads(body)["error"] == "malformed_body"
    deep_yaml = b"a: " + b"[" * 5000 + b"]" * 5000
    auth["Content-Type"] = "application/yaml"
    s, _, body = _raw(private_node, "POST", "/v1/functions", deep_yaml, auth)
    assert s == 400, body


def test_unknown_and_protected_functions_look_alike_without_a_token(private_node):
    deploy(private_node, "guarded", "size", invoke_token="guarded-invoke-token")
    a = _raw(private_node, "POST", "/v1/functions/guarded:invoke")
    b = _raw(private_node, "POST", "/v1/functions/no-such-function:invoke")
    assert a[0] == b[0] == 401
    wrong = {"Authorization": "Bearer not-the-right-token"}
    assert _raw(private_node, "POST", "/v1/functions/guarded:invoke", headers=wrong)[0] == 403
    assert _raw(private_node, "POST", "/v1/functions/no-such:invoke", headers=wrong)[0] == 403
    admin = {"Authorization": f"Bearer {TOKEN}"}
    assert _raw(private_node, "POST", "/v1/functions/no-such:invoke", headers=admin)[0] == 404


def test_metrics_need_a_token(private_node):
    assert _raw(private_node, "GET", "/metrics")[0] == 401
    s, _, body = _raw(private_node, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert s == 200 and b"hearth_dataplane_mode" in body


def test_platform_streams_cannot_be_a_trigger(private_node):
    spec = {
        "name": "snoop",
        "handler": "sec_handlers:size",
        "triggers": [{"type": "redis-stream", "stream": "hearth:fn:guarded:async"}],
    }
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    s, _, body = _raw(private_node, "POST", "/v1/functions", json.dumps(spec).encode(), auth)
    assert s == 400 and "reserved" in json.loads(body)["detail"]


@pytest.mark.parametrize("content", ["", "\n", "short"])
def test_empty_or_short_token_file_is_refused(tmp_path, content):
    (tmp_path / "admin-token").write_text(content)
    s = Settings(state=tmp_path)
    with pytest.raises(TokenError, match="admin-token"):
        s.ensure_admin_token()
