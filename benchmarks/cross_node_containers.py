"""`benchmarks/cross_node.py --containers`: the same measurements between two node containers of
the project's image (podman, each its own network namespace and /dev/shm, both on the eBPF data
plane), using the multi-node test harness (tests/cluster/cluster.py). The bare aiohttp server runs
in node-a's container; the raw-TCP loop sends from node-a's container to node-b's."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW_PORT, BARE_PORT = 7090, 7091


class ContainerRawTcp:
    """The baseline between the two containers: a receiver in node-b, a sender run in node-a."""

    def __init__(self, c, podman, receiver: str, sender: str, largest: int):
        self.c, self.podman, self.sender = c, podman, sender
        b = c.boxes["node-b"]
        podman("exec", "-d", b.cid, "python3", "-c", receiver, str(RAW_PORT), str(largest), b.ip)
        self.b_ip = b.ip
        time.sleep(1.0)

    def seconds(self, n: int) -> float:
        out = self.podman(
            "exec",
            self.c.boxes["node-a"].cid,
            "python3",
            "-c",
            self.sender,
            self.b_ip,
            str(RAW_PORT),
            str(n),
            "2",
            timeout=300,
        )
        return float(out.split()[-1])  # the second transfer: the first warms both sides' pages

    def close(self) -> None:
        pass  # the receiver goes with its container


def in_containers(n_lat, reps, measure, Side, node_env, bare: str, receiver: str, sender: str):
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from cluster import Cluster, build_image, podman  # the tests' harness

    image = build_image()
    with Cluster(image, shm_size="2g") as c:
        c.start_redis()
        for name in ("node-a", "node-b"):
            c.start_node(name, "ebpf", env=node_env)
        nodes = {}
        for name in ("node-a", "node-b"):
            health = c.wait_healthy(name)
            nodes[name] = Side(c.boxes[name].url, c.client(name, timeout=300), health["dataplane"])
        a = c.boxes["node-a"]
        podman("exec", "-d", a.cid, "python", "-c", bare, str(BARE_PORT), "0.0.0.0")
        bare_url = f"http://{a.ip}:{BARE_PORT}/echo"
        c.wait(lambda: _answers(bare_url), what="bare aiohttp server", timeout=30)
        raw = ContainerRawTcp(c, podman, receiver, sender, 256 << 20)
        return measure(
            nodes,
            bare_url,
            raw,
            n_lat,
            reps,
            f"two node containers of {image} (podman, eBPF data plane, private network)",
        )


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=b"x", method="POST"), timeout=2
        ):
            return True
    except OSError:
        return False
