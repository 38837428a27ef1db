"""The targets gateway_overhead.py measures, up together for one run: this tree's node (and, with
``--rev``, a node running that revision's ``platform/``), each with the no-op function deployed
and cold-started outside the measurement; the bare aiohttp server returning the same bytes; and
the lean client's floor (a minimal static responder). Also each node's busy-poll counters
(``hearth_agent_spin*``), read around a measurement."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hearth.localnode import LocalNode, start_node
from hearth.redis_server import free_port
from lean_load import RESPONDER

BARE = """
from aiohttp import web
async def h(request):
    await request.read()
    return web.Response(body=b"")
app = web.Application()
app.router.add_post("/noop", h)
web.run_app(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), print=None, access_log=None)
"""


def spin_counts(node) -> dict[str, float]:
    """The node's busy-polls for replies so far (`hearth_agent_spin*`), and its invocations."""
    body = node.client.request("GET", "/metrics", admin=True).body.decode()
    got = {"hits": 0.0, "misses": 0.0, "seconds": 0.0, "calls": 0.0}
    for line in body.splitlines():
        name, _, value = line.rpartition(" ")
        if name == 'hearth_agent_spins_total{outcome="hit"}':
            got["hits"] = float(value)
        elif name == 'hearth_agent_spins_total{outcome="miss"}':
            got["misses"] = float(value)
        elif name == "hearth_agent_spin_seconds_total":
            got["seconds"] = float(value)
        elif name.startswith("hearth_invocations_total{"):
            got["calls"] += float(value)
    return got


def spin_report(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Spins during one kind of measurement: per call, the share that spun, that got their
    reply while spinning, and the agent CPU the spins took."""
    d = {k: after[k] - before[k] for k in after}
    calls = max(d["calls"], 1.0)
    return {
        "calls": d["calls"],
        "spun": round((d["hits"] + d["misses"]) / calls, 3),
        "hit": round(d["hits"] / calls, 3),
        "spin_us_per_call": round(d["seconds"] / calls * 1e6, 1),
    }


def wait_http(
    url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 30
) -> None:
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}\n{tail}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


NOOP = {
    "name": "noop",
    "handler": "hearth.functions.examples.handlers:noop",
    "concurrency": 64,
    "max_instances": 1,
    "queue_size": 10000,
}


@dataclass
class Targets:
    """What one run measures: `urls` by target name (hearth, aiohttp, and ``@REV`` with a
    revision), the nodes whose spins are counted by the same names, the floor's URL."""

    node: LocalNode
    urls: dict[str, str]
    by_node: dict[str, LocalNode]
    floor_url: str


@contextmanager
def targets(
    tmp: Path, dataplane: str, rev: str | None, rev_platform: Path | None
) -> Iterator[Targets]:
    """The nodes (their state under `tmp`, each with its own redis-server), the bare server and
    the floor up and answering, the no-op deployed and cold-started on each node; all stopped
    on the way out."""
    node = start_node(tmp / "node", dataplane=dataplane)  # with its own redis-server
    nodes = [node]
    if rev_platform is not None:
        env = {"PYTHONPATH": str(rev_platform)}
        try:
            nodes.append(start_node(tmp / "node-rev", dataplane=dataplane, env=env))
        except BaseException:
            node.stop()
            raise
    bport = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bport)])
    fport = free_port()  # the lean client's floor: a minimal static responder
    floor = subprocess.Popen([sys.executable, "-c", RESPONDER, str(fport)])
    try:
        wait_http(f"http://127.0.0.1:{bport}/noop", bare)
        wait_http(f"http://127.0.0.1:{fport}/noop", floor)
        for n in nodes:
            n.client.deploy(NOOP)
            n.client.invoke("noop", b"")  # cold start outside the measurement
        urls = {
            "hearth": f"{node.url}/v1/functions/noop:invoke",
            "aiohttp": f"http://127.0.0.1:{bport}/noop",
        }
        if rev:
            urls[f"@{rev}"] = f"{nodes[1].url}/v1/functions/noop:invoke"
        # each node's busy-polls for replies (hearth.agent.spin), by kind of measurement
        by_node = {"hearth": node, f"@{rev}": nodes[-1]} if rev else {"hearth": node}
        yield Targets(node, urls, by_node, f"http://127.0.0.1:{fport}/noop")
    finally:
        for n in nodes:
            n.stop()
        for proc in (bare, floor):
            proc.terminate()
            proc.wait(10)
