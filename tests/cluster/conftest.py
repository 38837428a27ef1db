"""Session fixtures of the multi-node tests: the project's image (built once, reused), and one
cluster of containers on a private podman network (see cluster.py):

    redis · node-a (eBPF) · node-b (eBPF) · node-c (unix) · gateway (`hearth up --role gateway`)
    · controller (`python -m hearth.controller.k8s`) · the API emulator it talks to (in the test process, on the network's gateway address)

As root, a machine that cannot run them (no podman, no bpffs, eBPF not loading) fails the tests:
a skipped multi-node suite would look green. Without root they are skipped."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from cluster import Cluster, build_image, unavailable_reason
from kubeplay import KubePlay

NODES = [("node-a", "ebpf"), ("node-b", "ebpf"), ("node-c", "unix")]


@pytest.fixture(scope="session")
def hearth_image() -> str:
    why = unavailable_reason()
    if why:
        if os.geteuid() == 0:
            pytest.fail(f"the cluster tests cannot run here: {why}")
        pytest.skip(why)
    t0 = time.monotonic()
    image = build_image()
    print(f"\n[cluster] image {image} ready in {time.monotonic() - t0:.1f} s")
    return image


@pytest.fixture(scope="session")
def cluster(hearth_image: str) -> Iterator[Cluster]:
    t0 = time.monotonic()
    with Cluster(hearth_image) as c:  # removes every container by id, also after a failure
        c.start_redis()
        for name, dataplane in NODES:
            c.start_node(name, dataplane)
        c.start_gateway()
        for b in c.nodes:
            health = c.wait_healthy(b.name)
            # the data plane each node reports is the one it was asked for: never a silent
            # fallback from eBPF to unix
            assert health["dataplane"] == b.dataplane, (b.name, health, c.logs(b.name))
        c.wait_healthy("gateway")
        # the front knows every agent's address (a name never resolved makes a call wait on
        # the network's DNS, and a failed lookup sends it elsewhere: the routing tests assume
        # neither); /healthz names those it does not
        c.wait(
            lambda: not (h := c.healthz("gateway"))["unresolved"] and not h["down"],
            what="the front to know every node agent's address",
            timeout=60,
        )
        c.start_kube_api()
        c.start_controller()
        print(f"\n[cluster] {len(c.boxes)} containers up in {time.monotonic() - t0:.1f} s")
        yield c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed multi-node test's report carries the front gateway's /healthz and every
    container's last lines (a kube play test's: every pod's containers' states and last lines):
    CI keeps only the report, and the containers are gone after it."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    kp = getattr(item, "funcargs", {}).get("kp")
    if isinstance(kp, KubePlay):
        rep.sections.append(("kube play pods", kp.diagnostics()))
    c = getattr(item, "funcargs", {}).get("cluster")
    if not isinstance(c, Cluster):
        return
    parts = []
    try:
        parts.append(f"front /healthz: {c.healthz('gateway')}")
    except Exception as e:  # the report must not fail on its own diagnostics
        parts.append(f"front /healthz: {e!r}")
    for name in list(c.boxes):
        try:
            parts.append(f"--- {name} ({c.state(name)}), last lines ---\n{c.logs(name, tail=40)}")
        except Exception as e:
            parts.append(f"--- {name}: {e!r}")
    rep.sections.append(("cluster containers", "\n".join(parts)))
