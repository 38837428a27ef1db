"""The published API (docs/openapi.json) fuzzed with schemathesis against a real `hearth up`:
no request, with or without the admin token, gets a 5xx, and the node stays healthy."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hearth.localnode import start_node
from hypothesis import HealthCheck, settings
from sec_helpers import TOKEN

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
schema = schemathesis.openapi.from_path(DOC)
NODE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def fuzz_node(redis_server, tmp_path_factory):
    node = start_node(
        tmp_path_factory.mktemp("sec-fuzz"),
        redis_url=redis_server.url,
        token=TOKEN,
        dataplane="unix",
        env={"HEARTH_MAX_BODY_BYTES": str(1 << 20)},
    )
    node.client.deploy({"name": "hello", "handler": "hearth.functions.examples.handlers:hello"})
    NODE["node"] = node
    yield node
    node.stop()


@pytest.mark.parametrize("admin", [False, True], ids=["anonymous", "admin"])
@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case, admin):
    node = NODE["node"]
    if case.operation.path == "/v1/functions/{name}:invoke":
        case.path_parameters = {"name": "hello"}  # past the name check, into the body path
    if admin:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    r = case.call(base_url=node.url, timeout=30)
    assert r.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {r.status_code}: {r.text[:300]}"
    )
    if r.status_code >= 400 and r.headers.get("Content-Type", "").startswith("application/json"):
        body = r.json()
        assert {"error", "detail"} <= set(body), body


def test_node_still_healthy_after_fuzzing(fuzz_node):
    assert fuzz_node.proc.poll() is None
    assert fuzz_node.client.request("GET", "/healthz").json()["status"] == "ok"
    r = fuzz_node.client.invoke("hello", b'{"name": "after"}', "application/json")
    assert r.json()["greeting"] == "hello, after"
