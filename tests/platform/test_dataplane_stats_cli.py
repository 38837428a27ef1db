"""`hearth dataplane stats` as docs/dataplane.md shows it, run beside a real `hearth up`: with
no --socket it queries that node's proxy daemon (<state>/run/proxy-<port>.sock), and a missing
daemon is named with what to do. It used to try /run/hearth/proxy.sock (the chart's path) only,
so on the README's node it answered 'cannot query proxy ... No such file or directory'."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlparse

from realnode import start_checked


def stats(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "HEARTH_PROXY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", "dataplane", "stats"],
        capture_output=True,
        text=True,
        env=clean | env,
        timeout=60,
    )


def test_stats_finds_the_local_nodes_proxy_and_names_a_missing_one(tmp_path):
    node = start_checked(tmp_path / "s")
    try:
        port = str(urlparse(node.url).port)
        p = stats({"HEARTH_STATE_DIR": str(node.state), "HEARTH_PORT": port})
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(f"mode: {node.dataplane} (")
        assert "endpoints: " in p.stdout
    finally:
        node.stop()
    gone = tmp_path / "gone.sock"
    p = stats({"HEARTH_PROXY_SOCKET": str(gone)})
    assert p.returncode == 1
    assert p.stderr.strip() == (
        f"error: no proxy daemon at {gone}: is `hearth up` running? (--socket names another)"
    )
