"""The controller's `/metrics` (Prometheus text) and `/healthz` (liveness: a reconcile finished
within `stale_after_s`) on a small threaded HTTP server. No admin actions, so no token: it
listens on the pod IP for the kubelet and Prometheus only (or loopback by default)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _Collector:
    def __init__(self, ctl) -> None:
        self.ctl = ctl

    def collect(self):
        for k, v in sorted(self.ctl.stats.items()):
            c = CounterMetricFamily(f"hearth_controller_{k}", f"Controller {k.replace('_', ' ')}.")
            c.add_metric([], float(v))
            yield c
        g = GaugeMetricFamily(
            "hearth_controller_last_reconcile_timestamp_seconds",
            "Unix time of the last reconcile that finished without an error.",
        )
        g.add_metric([], float(self.ctl.last_reconcile_ok or 0.0))
        yield g


def serve(
    ctl, host: str, port: int, stale_after_s: float, clock: Callable[[], float]
) -> ThreadingHTTPServer:
    """Start the server in a daemon thread; `.shutdown()` stops it."""
    registry = CollectorRegistry()
    registry.register(_Collector(ctl))

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                return self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
            if self.path == "/healthz":
                last = ctl.last_reconcile_ok
                ok = last is not None and clock() - last <= stale_after_s
                body = {"ok": ok, "last_reconcile": last}
                return self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
            body = {"error": "not_found", "detail": f"no route {self.path}"}
            return self._send(404, json.dumps(body).encode(), "application/json")

    srv = ThreadingHTTPServer((host, port), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="hearth-ctl-http").start()
    return srv
