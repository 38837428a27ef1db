"""Start and stop a real `hearth up` process (gateway + node agent + proxy + instances)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hearth.client import Client, ClientError
from hearth.redis_server import free_port

TOKEN = "test-admin-token-0123456789"
H = "hearth.functions.examples.handlers"


@dataclass
class Hearth:
    url: str
    proc: subprocess.Popen
    state: Path
    client: Client
    mode: str

    def deploy(self, **spec) -> None:
        self.client.deploy(spec)

    def wait(self, cond, timeout: float = 20.0, what: str = "condition"):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            v = cond()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def instances(self, name: str) -> list[dict]:
        st = self.client.status()["functions"].get(name)
        return [
            i for i in (st or {}).get("instances", []) if i["state"] not in ("stopping", "dead")
        ]


def start_hearth(
    tmp: Path, redis_url: str, mode: str = "auto", extra_env: dict | None = None
) -> Hearth:
    port = free_port()
    env = {
        **os.environ,
        "HEARTH_PORT": str(port),
        "HEARTH_STATE_DIR": str(tmp),
        "HEARTH_REDIS_URL": redis_url,
        "HEARTH_ADMIN_TOKEN": TOKEN,
        "HEARTH_DATAPLANE": mode,
        "HEARTH_MAX_BODY_BYTES": str(96 * 1024 * 1024),
        **(extra_env or {}),
    }
    log = open(tmp / "hearth-up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "hearth.cli", "up", "--warm-pool", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = Client(f"http://127.0.0.1:{port}", token=TOKEN, timeout=60)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"hearth up exited: {(tmp / 'hearth-up.log').read_text()[-2000:]}")
        try:
            h = client.request("GET", "/healthz").json()
            return Hearth(client.url, proc, tmp, client, h["dataplane"])
        except ClientError:
            if time.monotonic() - t0 > 30:
                proc.kill()
                raise
            time.sleep(0.1)


def stop_hearth(h: Hearth) -> None:
    h.proc.send_signal(signal.SIGINT)
    try:
        h.proc.wait(30)
    except subprocess.TimeoutExpired:
        h.proc.kill()
        h.proc.wait()
