"""A real `hearth up` node as a child process: started, waited for, stopped. The one way tests,
benchmarks and scripts get a node of their own (private state dir, port, token; Redis from
`redis_url` or a private redis-server)."""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hearth.client import Client, ClientError
from hearth.parent_death import die_with_parent
from hearth.redis_server import free_port


class NodeStartError(RuntimeError):
    """`hearth up` exited or did not answer /healthz in time; the message ends with its log."""


@dataclass
class LocalNode:
    url: str
    proc: subprocess.Popen
    state: Path
    client: Client
    token: str
    dataplane: str
    log_path: Path
    remove_state: bool = False  # its state directory is a private temporary one: `stop` removes it

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        """SIGINT (drain in-flight invocations, stop instances, proxy and Redis), then kill."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.remove_state:  # (after the node and its Redis have stopped writing to it)
            shutil.rmtree(self.state, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> LocalNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_node(
    state: Path | str | None,
    *,
    redis_url: str | None = None,
    token: str | None = None,
    dataplane: str = "auto",
    warm_pool: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    client_timeout: float = 60,
    port: int | None = None,
    nofile: int | None = None,
) -> LocalNode:
    """Start `hearth up` with its state in `state` and wait until /healthz answers.

    `redis_url=None` lets the node start its own redis-server. `env` adds or overrides
    HEARTH_* settings (e.g. HEARTH_MAX_BODY_BYTES, HEARTH_POOL_CLASSES). `port`: a given one
    (a node restarted on its old port), else a free one. `nofile`: the node's soft and hard
    RLIMIT_NOFILE (a test of a node under a low descriptor limit). `state=None`: a private
    temporary directory, removed when the node stops (or fails to start): benchmarks that
    started a node in a `mkdtemp` of their own left one behind per run."""
    if state is None:
        tmp = Path(tempfile.mkdtemp(prefix="hearth-node-"))
        try:
            node = start_node(
                tmp,
                redis_url=redis_url,
                token=token,
                dataplane=dataplane,
                warm_pool=warm_pool,
                env=env,
                timeout=timeout,
                client_timeout=client_timeout,
                port=port,
                nofile=nofile,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        node.remove_state = True
        return node
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_hex(16)
    full = {
        **os.environ,
        "HEARTH_STATE_DIR": str(state),
        "HEARTH_ADMIN_TOKEN": token,
        "HEARTH_DATAPLANE": dataplane,
    }
    full.pop("HEARTH_REDIS_URL", None)
    if redis_url:
        full["HEARTH_REDIS_URL"] = redis_url
    full.update(env or {})
    argv = [sys.executable, "-m", "hearth.cli", "up", "--warm-pool", str(warm_pool)]
    for attempt in range(3):
        p = port or free_port()
        try:
            return _start_on(
                argv,
                {**full, "HEARTH_PORT": str(p)},
                p,
                token,
                dataplane,
                state,
                timeout,
                client_timeout,
                nofile,
            )
        except PortTaken:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(NodeStartError):
    """Another server answered on the port picked for the node (it was taken between the pick
    and the node's bind, by a process beside this one)."""


def _start_on(
    argv: list[str],
    full: dict[str, str],
    port: int,
    token: str,
    dataplane: str,
    state: Path,
    timeout: float,
    client_timeout: float,
    nofile: int | None = None,
) -> LocalNode:
    """One start of `hearth up` on `port`; PortTaken when another server holds the port."""
    log_path = state / "hearth-up.log"
    node = _spawn(argv, full, port, token, dataplane, log_path, client_timeout, nofile)
    node.dataplane = _wait_healthy(node, timeout).get("dataplane", "?")
    # /healthz is open: make sure it was this node that answered, not a server that took the
    # port first (this node then fails to bind and exits; its caller would talk to a stranger)
    # (any HTTP answer but 200 is a stranger's; no answer at all is a failed start: either
    # way the child is stopped, never left behind)
    try:
        node.client.request("GET", "/v1/functions", admin=True, ok=(200,))
    except ClientError as e:
        node.stop(5)
        if e.status:
            raise PortTaken(f"port {port} is answered by another server: {e.status}") from None
        raise NodeStartError(
            f"hearth up answered /healthz, then not: {e}\n{node.log_tail()}"
        ) from None
    return node


def start_front(
    state: Path | str,
    agents: list[str],
    *,
    token: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    client_timeout: float = 60,
) -> LocalNode:
    """Start the front gateway (`hearth up --role gateway`) before `agents` (node-agent URLs)
    and wait until its /healthz answers; `state` holds its log."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_hex(16)
    port = free_port()
    full = {
        **os.environ,
        "HEARTH_PORT": str(port),
        "HEARTH_ADMIN_TOKEN": token,
        "HEARTH_NODE_AGENTS": ",".join(agents),
        **(env or {}),
    }
    full.pop("HEARTH_REDIS_URL", None)
    argv = [sys.executable, "-m", "hearth.cli", "up", "--role", "gateway"]
    front = _spawn(argv, full, port, token, "gateway", state / "front.log", client_timeout)
    _wait_healthy(front, timeout)
    return front


def _spawn(
    argv: list[str],
    env: dict[str, str],
    port: int,
    token: str,
    dataplane: str,
    log_path: Path,
    client_timeout: float,
    nofile: int | None = None,
) -> LocalNode:
    tie = die_with_parent(signal.SIGTERM)

    def preexec() -> None:
        tie()
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        # SIGTERM (`hearth up` stops its instances, proxy and Redis) when the test or benchmark
        # that started it dies without stopping it (SIGTERM, SIGKILL: no teardown runs)
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
    client = Client(f"http://127.0.0.1:{port}", token=token, timeout=client_timeout)
    return LocalNode(client.url, proc, log_path.parent, client, token, dataplane, log_path)


def _wait_healthy(node: LocalNode, timeout: float) -> dict:
    """Its /healthz answer, once it gives one; NodeStartError if it exits or times out."""
    t0 = time.monotonic()
    while True:
        if node.proc.poll() is not None:
            tail = node.log_tail()
            # the port was taken between the pick and the bind, before anything answered
            err = PortTaken if "address already in use" in tail.lower() else NodeStartError
            raise err(f"hearth up exited with code {node.proc.returncode}:\n{tail}")
        try:
            return node.client.request("GET", "/healthz").json()
        except ClientError:
            if time.monotonic() - t0 > timeout:
                node.stop(5)
                raise NodeStartError(
                    f"hearth up did not answer /healthz within {timeout:g}s:\n{node.log_tail()}"
                ) from None
            time.sleep(0.1)
