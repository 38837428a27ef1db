"""Start and stop a real `hearth up` process (gateway + node agent + proxy + instances)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hearth.client import Client, ClientError
from hearth.localnode import LocalNode, start_node
from realnode import wait_for

TOKEN = "test-admin-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]
H = "hearth.functions.examples.handlers"


@dataclass
class Hearth:
    url: str
    proc: subprocess.Popen
    state: Path
    client: Client
    mode: str
    node: LocalNode

    def deploy(self, **spec) -> None:
        self.client.deploy(spec)

    def wait(self, cond, timeout: float = 20.0, what: str = "condition"):
        return wait_for(cond, timeout, what)

    def instances(self, name: str) -> list[dict]:
        st = self.client.status()["functions"].get(name)
        return [
            i for i in (st or {}).get("instances", []) if i["state"] not in ("stopping", "dead")
        ]


def start_hearth(
    tmp: Path, redis_url: str, mode: str = "auto", extra_env: dict | None = None
) -> Hearth:
    node = start_node(
        tmp,
        redis_url=redis_url,
        token=TOKEN,
        dataplane=mode,
        warm_pool=1,
        env={"HEARTH_MAX_BODY_BYTES": str(96 * 1024 * 1024), **(extra_env or {})},
    )
    return Hearth(node.url, node.proc, tmp, node.client, node.dataplane, node)


def stop_hearth(h: Hearth) -> None:
    h.node.stop()


def start_front(env: dict[str, str], c: Client) -> subprocess.Popen:
    """`hearth up --role gateway` with `env`, once it answers /healthz through `c`; fails if it
    exits first or takes over 60 s (an interpreter start: seconds on a loaded machine)."""
    front = subprocess.Popen(
        [sys.executable, "-m", "hearth.cli", "up", "--role", "gateway"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.monotonic()
    while True:  # an interpreter start: seconds on a loaded machine
        try:
            c.request("GET", "/healthz")
            break
        except ClientError:
            assert front.poll() is None, "front gateway exited at start"
            assert time.monotonic() - t0 < 60, "front gateway did not answer /healthz in 60 s"
            time.sleep(0.05)
    return front


def run_cli(
    args: list[str] | tuple[str, ...], env: dict[str, str], input: str | None = None, timeout=60
) -> subprocess.CompletedProcess:
    """`hearth ARGS` in a child process with exactly `env`, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=input,
        cwd=ROOT,
        timeout=timeout,
    )
