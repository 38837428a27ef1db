"""start_node talks only to the node it started: a stranger on the picked port is noticed."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from hearth.localnode import PortTaken, start_node


class Stranger(http.server.BaseHTTPRequestHandler):
    """Another server on the port: an open /healthz, admin calls refused (its token differs)."""

    def do_GET(self) -> None:  # noqa: N802
        ok = self.path == "/healthz"
        body = json.dumps({"status": "ok"} if ok else {"error": "forbidden"}).encode()
        self.send_response(200 if ok else 403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_a) -> None:
        pass


def test_a_port_answered_by_another_server_is_not_taken_for_the_node(tmp_path, redis_url):
    """Seen in CI with test parts side by side: a node's port was taken between the pick and
    its bind, the stranger's /healthz answered, and the test then got 403 from a server it
    never started. Now the start fails, naming the port, and nothing of the node is left."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stranger)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        with pytest.raises(PortTaken, match=f"port {port} is answered by another server"):
            start_node(tmp_path / "n", redis_url=redis_url, dataplane="unix", port=port)
    finally:
        srv.shutdown()
        srv.server_close()


class NotHearth(Stranger):
    """A stranger that is no Hearth node at all: /healthz answers, every other path is 404."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/healthz":
            return super().do_GET()
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_picked_port_answered_by_any_other_server_is_given_up_for_another(
    tmp_path, redis_url, monkeypatch
):
    """The stranger's admin answer may be anything (here 404, not Hearth's 401/403): it is
    still not our node, so start_node picks another port and returns the node it started
    (it used to let the ClientError escape: no retry, the start failed)."""

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotHearth)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        _starts_elsewhere(srv.server_address[1], tmp_path, redis_url, monkeypatch)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_picked_port_taken_before_the_node_binds_is_given_up_for_another(
    tmp_path, redis_url, monkeypatch
):
    """The other order of the same race: the port is taken (bound, not yet answering) before
    the node binds, so the node exits 'Address already in use' before anything answers
    /healthz. start_node picks another port (it used to fail with NodeStartError)."""
    import socket


    taker = socket.socket()
    taker.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused, binds fail
    try:
        _starts_elsewhere(taker.getsockname()[1], tmp_path, redis_url, monkeypatch)
    finally:
        taker.close()


def _starts_elsewhere(taken: int, tmp_path, redis_url, monkeypatch) -> None:
    """start_node's first pick is the `taken` port: it must give it up and return its own node,
    answering our admin token, on another port."""
    from hearth import localnode

    ports = [taken]
    real = localnode.free_port
    monkeypatch.setattr(localnode, "free_port", lambda: ports.pop() if ports else real())
    with start_node(tmp_path / "n", redis_url=redis_url, dataplane="unix") as node:
        assert not ports, "the taken port was never picked"
        assert node.url != f"http://127.0.0.1:{taken}"
        assert node.client.request("GET", "/v1/functions", admin=True).status == 200
