"""A Hearth cluster on one machine, from the project's own image on podman (reusable harness).

    image = build_image()                      # scripts/image.sh: quiet when current
    with Cluster(image) as c:                  # a private podman network of its own
        c.start_redis()
        c.start_node("node-a", "ebpf")         # own network namespace and /dev/shm
        c.start_node("node-c", "unix")
        c.start_gateway()                      # `hearth up --role gateway` before the agents
        c.front.invoke(...)                    # hearth.client.Client on the front gateway

Every container is created with the labels below and removed by id when the cluster closes
(also when a test failed); containers left by a test session that was killed are removed by the
next one. The test process reaches the containers over the private network (the host has an
address on its bridge), never through anything published beyond it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.client import Client, ClientError

ROOT = Path(__file__).resolve().parents[2]
LABEL = "dev.hearth.test-session"
AGENT_PORT = 8080
LINK_PORT = 7070
EBPF_ARGS = [
    "--privileged",
    "-v",
    "/sys/fs/bpf:/sys/fs/bpf",
    "-v",
    "/lib/modules:/lib/modules:ro",
    "-v",
    "/usr/src:/usr/src:ro",
]


class PodmanError(RuntimeError):
    pass


def podman_env() -> dict[str, str]:
    c = ROOT / ".containers"
    return {
        **os.environ,
        "CONTAINERS_CONF": str(c / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(c / "storage.conf"),
    }


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run podman on the project's store; stdout (stripped). Errors carry podman's stderr."""
    r = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise PodmanError(f"podman {' '.join(args[:3])} …: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip()


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster (None: it can)."""
    if os.geteuid() != 0:
        return "podman containers with eBPF need root"
    for tool in ("podman", "buildah", "debootstrap", "runc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    if not os.path.isdir("/sys/fs/bpf") or not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf"
    return None


def build_image() -> str:
    """`make image` (without the venv step): builds or confirms localhost/hearth:<version>."""
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        raise PodmanError(f"make image failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    if r.stdout.strip():
        print(r.stdout.strip())  # shown with -s: the one-time build and its duration
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "image.sh"), "image-name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# how to list and remove each kind of podman object a test session labels
_STALE = {
    "container": (("ps", "-a"), ("rm", "-f", "-t", "0")),
    "pod": (("pod", "ls"), ("pod", "rm", "-f", "-t", "0")),
    "network": (("network", "ls"), ("network", "rm", "-f")),
}


def remove_stale(label: str, *kinds: str) -> None:
    """Objects of these kinds labelled `label`=<pid>-<nonce> by a test session whose process is
    gone (a killed pytest) are removed by id; those of live sessions are left alone."""
    for kind in kinds:
        ls, rm = _STALE[kind]
        try:
            out = podman(*ls, "--filter", f"label={label}", "--format", "{{.ID}} {{.Labels}}")
        except PodmanError:
            continue
        for line in out.splitlines():
            rid = line.split()[0]
            owner = re.search(re.escape(label) + r"[:=](\d+)-", line)  # map[k:v] or k=v
            if owner and not os.path.exists(f"/proc/{owner[1]}"):
                podman(*rm, rid, check=False)


def session_network(label: str, session: str, prefix: str, *stale: str) -> str:
    """A test session's private podman network, labelled `label`=`session`, made after removing
    the `stale` kinds of objects killed sessions of the same label left behind."""
    remove_stale(label, *stale)
    network = f"{prefix}-net"
    podman("network", "create", "--label", f"{label}={session}", network)
    return network


def poll(cond, what: str, timeout: float, every: float):
    """`cond()`'s first truthy value within `timeout`. Its exceptions mean "not up yet" (the
    timeout names the last one), but an AssertionError is a definite failure (an exited
    container): no waiting."""
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            v = cond()
            if v:
                return v
        except AssertionError:
            raise
        except Exception as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last})")


@dataclass
class Box:
    """One container of the cluster."""

    name: str  # also its DNS name on the cluster network
    cid: str
    role: str
    dataplane: str = ""
    ip: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{AGENT_PORT}"


@dataclass
class Cluster:
    image: str
    token: str = field(default_factory=lambda: "hth_" + secrets.token_urlsafe(24))
    redis_password: str = field(default_factory=lambda: secrets.token_hex(16))
    cluster_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    shm_size: str = "1g"
    boxes: dict[str, Box] = field(default_factory=dict)
    network: str = ""

    def __post_init__(self) -> None:
        self.session = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.prefix = f"hc{uuid.uuid4().hex[:6]}"
        self.emulator: Any = None  # the API emulator (start_kube_api), in this process
        self.kube_url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.network = session_network(LABEL, self.session, self.prefix, "container")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        ids = [b.cid for b in self.boxes.values()]
        if ids:
            podman("rm", "-f", "-t", "2", *ids, check=False, timeout=180)
        self.boxes.clear()
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        if self.network:
            podman("network", "rm", "-f", self.network, check=False)
            self.network = ""

    # -- containers --------------------------------------------------------------------------
    def run(
        self,
        name: str,
        role: str,
        command: list[str],
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
        dataplane: str = "",
    ) -> Box:
        """Start one container of the cluster (its DNS name on the network is `name`)."""
        args = ["run", "-d", "--name", f"{self.prefix}-{name}", "--hostname", name]
        args += ["--network", self.network, "--network-alias", name]
        args += ["--label", f"{LABEL}={self.session}", "--shm-size", self.shm_size]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        cid = podman(*args, *(extra or []), self.image, *command)
        box = Box(name, cid, role, dataplane)
        self.boxes[name] = box
        box.ip = self.ip(name)
        return box

    def ip(self, name: str) -> str:
        return podman(
            "inspect",
            "--format",
            f"{{{{(index .NetworkSettings.Networks {self.network!r}).IPAddress}}}}".replace(
                "'", '"'
            ),
            self.boxes[name].cid,
        )

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@redis:6379/0"

    def start_redis(self) -> Box:
        cmd = ["redis-server", "--requirepass", self.redis_password, "--save", ""]
        box = self.run("redis", "redis", cmd + ["--appendonly", "no"])
        self.wait(lambda: self.redis().ping(), what="redis", timeout=60)
        return box

    def redis(self):
        import redis

        return redis.Redis(
            host=self.boxes["redis"].ip, port=6379, password=self.redis_password, socket_timeout=10
        )

    def agent_env(self, name: str) -> dict[str, str]:
        return {
            "HEARTH_HOST": "0.0.0.0",  # the cluster network only: nothing is published
            "HEARTH_PORT": str(AGENT_PORT),
            "HEARTH_NODE": name,
            "HEARTH_REDIS_URL": self.redis_url,
            "HEARTH_ADMIN_TOKEN": self.token,
            # the agent-to-agent link, on the cluster network; peers dial the node's DNS name
            "HEARTH_CLUSTER_TOKEN": self.cluster_token,
            "HEARTH_LINK_HOST": "0.0.0.0",
            "HEARTH_LINK_PORT": str(LINK_PORT),
            "HEARTH_ADVERTISE": name,
            "HEARTH_HEARTBEAT_S": "0.5",
        }

    def start_node(
        self, name: str, dataplane: str, warm_pool: int = 1, env: dict[str, str] | None = None
    ) -> Box:
        """A node agent in its own container: its own network namespace and /dev/shm; on eBPF
        privileged with bpffs, the modules and the kernel headers mounted."""
        return self.run(
            name,
            "node-agent",
            [
                "hearth",
                "up",
                "--role",
                "node-agent",
                "--dataplane",
                dataplane,
                "--warm-pool",
                str(warm_pool),
            ],
            {**self.agent_env(name), **(env or {})},
            EBPF_ARGS if dataplane == "ebpf" else [],
            dataplane,
        )

    def start_gateway(self, name: str = "gateway", extra: list[str] | None = None) -> Box:
        agents = ",".join(
            f"http://{b.name}:{AGENT_PORT}" for b in self.boxes.values() if b.role == "node-agent"
        )
        env = {
            "HEARTH_HOST": "0.0.0.0",
            "HEARTH_PORT": str(AGENT_PORT),
            "HEARTH_NODE_AGENTS": agents,
            "HEARTH_REDIS_URL": self.redis_url,  # routes by the peers' ready instances
        }
        return self.run(name, "gateway", ["hearth", "up", "--role", "gateway"], env, extra)

    # -- the controller (Kubernetes backend) against the API emulator -----------------------
    def start_kube_api(self) -> None:
        """The controller tests' Kubernetes API emulator (tests/controller/k8s_emulator.py), with
        this cluster's node agents as its Nodes. It runs in this test process and listens on the
        cluster network's gateway address, which the containers reach: its admission checks use
        test-only packages (cel-python, jsonschema) that the product image does not carry. Only
        the API server is emulated: the controller that talks to it is the real one, in a
        container of the image."""
        emu_dir = str(ROOT / "tests" / "controller")
        if emu_dir not in sys.path:
            sys.path.insert(0, emu_dir)
        from k8s_emulator import Emulator

        out = podman(
            "network", "inspect", "--format", "{{range .Subnets}}{{.Gateway}} {{end}}", self.network
        ).split()
        assert out, f"network {self.network} has no gateway address"
        self.emulator = Emulator([(b.name, "2", "4Gi") for b in self.nodes], host=out[0]).start()
        self.kube_url = self.emulator.url
        self.wait(lambda: self.kube().list_node().items, what="kube api emulator", timeout=60)

    def kube(self):
        """A CoreV1Api on the emulator (the official kubernetes client)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.kube_url
        return client.CoreV1Api(client.ApiClient(cfg))

    def start_controller(self, namespace: str = "default") -> Box:
        """`python -m hearth.controller.k8s` from the image, with a kubeconfig for the emulator."""
        kubeconfig = (
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: c, cluster: {{server: '{self.kube_url}'}}}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
        )
        script = (
            "import os, sys; open('/tmp/kubeconfig', 'w').write(os.environ['KUBECONFIG_TEXT']); "
            "from hearth.controller.k8s.__main__ import main; "
            f"sys.exit(main(['--namespace', {namespace!r}, '--resync', '5']))"
        )
        env = {
            "KUBECONFIG_TEXT": kubeconfig,
            "KUBECONFIG": "/tmp/kubeconfig",
            "HEARTH_FUNCTION_IMAGE": self.image,
            "HEARTH_REDIS_URL": self.redis_url,
        }
        return self.run("controller", "controller", ["python", "-c", script], env)

    def client(self, name: str, timeout: float = 60) -> Client:
        return Client(self.boxes[name].url, token=self.token, timeout=timeout)

    @property
    def front(self) -> Client:
        return self.client("gateway")

    @property
    def nodes(self) -> list[Box]:
        return [b for b in self.boxes.values() if b.role == "node-agent"]

    def agent_url(self, name: str) -> str:
        """The URL the front gateway knows this node agent by (X-Hearth-Node-Agent)."""
        return f"http://{name}:{AGENT_PORT}"

    # -- waiting and failures ----------------------------------------------------------------
    def wait(self, cond, what: str, timeout: float = 120, every: float = 0.2):
        return poll(cond, what, timeout, every)

    def healthz(self, name: str) -> dict:
        return self.client(name, timeout=5).request("GET", "/healthz").json()

    def wait_healthy(self, name: str, timeout: float = 180) -> dict:
        """/healthz of one container; fails with its log when it exited instead."""

        def ready():
            state = self.state(name)
            if state != "running":
                raise AssertionError(f"{name} is {state}:\n{self.logs(name)}")
            try:
                return self.healthz(name)
            except ClientError:
                return None

        try:
            return self.wait(ready, what=f"{name} /healthz", timeout=timeout, every=0.3)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- {name} log ---\n{self.logs(name)}") from None

    def state(self, name: str) -> str:
        return podman("inspect", "--format", "{{.State.Status}}", self.boxes[name].cid)

    def exit_code(self, name: str) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.boxes[name].cid))

    def logs(self, name: str, tail: int | None = 60) -> str:
        """Its stdout and stderr, interleaved; the last `tail` lines (None: all)."""
        cmd = ["podman", "logs"] + (["--tail", str(tail)] if tail else [])
        r = subprocess.run(
            [*cmd, self.boxes[name].cid],
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return r.stdout + r.stderr if tail is None else (r.stdout + r.stderr)[-6000:]

    def kill(self, name: str) -> None:
        """`podman kill`: SIGKILL to every process of the container; its filesystem stays."""
        podman("kill", self.boxes[name].cid)
        self.wait(lambda: self.state(name) != "running", what=f"{name} to die", timeout=30)

    def restart(self, name: str) -> None:
        """`podman start` of a killed container (same filesystem, same state dir)."""
        podman("start", self.boxes[name].cid)
        self.boxes[name].ip = self.ip(name)

    def remove(self, name: str) -> None:
        podman("rm", "-f", "-t", "2", self.boxes.pop(name).cid, check=False)

    def stop(self, name: str, timeout_s: int = 20) -> int:
        """`podman stop` (SIGTERM, then SIGKILL after timeout_s); the container's exit code."""
        podman("stop", "-t", str(timeout_s), self.boxes[name].cid, timeout=timeout_s + 60)
        return self.exit_code(name)
