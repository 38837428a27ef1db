"""H3: request bodies cannot blow up the agent's memory.

A 256 MiB JSON body and a 256 MiB msgpack body (the worst kind: an array of small numbers, which
costs 20-60x its size once parsed) must not raise the agent's peak RSS by more than the body's size
(the body's one copy lives in a shared-memory slot, which the agent's RSS counts); bodies without
Content-Length are capped like the others."""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path

import pytest
from sec_helpers import rss

MIB = 1 << 20
BODY = int(os.environ.get("HEARTH_TEST_BODY_MIB", "256")) * MIB
SLACK = 16 * MIB  # socket and parser buffers


# the node under test (conftest.size_node)
NODE_ENV = {
    "HEARTH_MAX_BODY_BYTES": str(BODY + MIB),
    "HEARTH_POOL_CLASSES": f"64KiB:256,1MiB:64,{(BODY >> 20) + 2}MiB:2",
}
SIZE_SPEC = {"timeout_s": 120}
NODE_CLIENT_TIMEOUT = 300


def _post(node, body: bytes | None, ctype: str, chunks=None) -> tuple[int, bytes]:
    port = int(node.url.rsplit(":", 1)[1])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        c.request(
            "POST",
            "/v1/functions/size:invoke",
            body=chunks if chunks is not None else body,
            headers={"Content-Type": ctype},
            encode_chunked=chunks is not None,
        )
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _peak_rise(node, send) -> tuple[int, int, bytes]:
    pid = node.proc.pid
    _post(node, b"{}", "application/json")  # warm: instance running, buffers allocated
    before = rss(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    status, out = send()
    return rss(pid, "VmHWM") - before, status, out


def _json_body(n: int) -> bytes:
    unit = b"1,"
    return b"[" + unit * ((n - 3) // 2) + b"1" + b"]" + b" " * ((n - 3) % 2)


def _msgpack_body(n: int) -> bytes:
    head = b"\xdd" + (n - 5).to_bytes(4, "big")  # array 32 of n-5 positive fixints
    return head + b"\x01" * (n - 5)


@pytest.mark.parametrize("kind", ["json", "msgpack"])
def test_large_body_does_not_multiply_memory(size_node, kind):
    body = _json_body(BODY) if kind == "json" else _msgpack_body(BODY)
    assert len(body) == BODY
    ctype = "application/json" if kind == "json" else "application/msgpack"
    rise, status, out = _peak_rise(size_node, lambda: _post(size_node, body, ctype))
    assert status == 200, out[:500]
    assert json.loads(out)["bytes"] == BODY
    assert rise <= BODY + SLACK, (
        f"peak RSS rose {rise / MIB:.0f} MiB for a {BODY / MIB:.0f} MiB body"
    )


def test_body_without_content_length_is_capped(size_node):
    limit = BODY + MIB
    part = b"\0" * (4 * MIB)

    def chunks():
        sent = 0
        while sent <= limit:
            yield part
            sent += len(part)

    t0 = time.monotonic()
    status, out = _post(size_node, None, "application/octet-stream", chunks())
    assert status == 413 and json.loads(out)["error"] == "payload_too_large"
    assert time.monotonic() - t0 < 120
