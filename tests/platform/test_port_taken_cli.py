"""The README's tour when port 8080 is taken, through the real CLI: `hearth up` on a taken port
says what to do (--port, and HEARTH_PORT for the CLI), and a CLI command that finds no gateway
says how to point it at a node on another port. Both used to end at 'address already in use'
and '(is `hearth up` running?)', though a node moved with --port alone was running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from hearth.redis_server import free_port


def hearth(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *args],
        capture_output=True,
        text=True,
        env=base | env,
        timeout=120,
    )


def test_up_on_a_taken_port_says_how_to_move_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = hearth({"HEARTH_STATE_DIR": str(tmp_path / "s")}, "up", "--port", str(port))
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), last
    assert last.endswith(
        "(another `hearth up`? pick a free port: --port N, and HEARTH_PORT=N for the CLI)"
    ), last
    assert not Path(f"/dev/shm/hearth-local-{port}").exists()


def test_a_cli_command_with_no_gateway_says_how_to_name_another_port(tmp_path):
    port = free_port()
    p = hearth({"HEARTH_PORT": str(port), "HEARTH_STATE_DIR": str(tmp_path)}, "ls")
    assert p.returncode == 1
    assert p.stderr.strip() == (
        f"error: cannot reach the gateway at http://127.0.0.1:{port}: [Errno 111] Connection "
        "refused (is `hearth up` running? on another port: HEARTH_PORT=N, or "
        "HEARTH_URL=http://host:N)"
    )
