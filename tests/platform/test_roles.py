"""Several node agents sharing one Redis behind the front gateway (`--role gateway`): a deploy
through any of them reaches all (registry sync), invocations of a function stick to its home
node, and the front fails over when that node agent goes away."""

from __future__ import annotations

import os
import subprocess
import sys

from hearth.gateway.front import rendezvous
from hearth.redis_server import free_port

H = "hearth.functions.examples.handlers"


def test_rendezvous_is_stable_and_spreads():
    nodes = ["a", "b", "c"]
    homes = {f: rendezvous(f, nodes)[0] for f in (f"fn-{i}" for i in range(60))}
    assert len(set(homes.values())) == 3  # functions spread over the nodes
    # removing a node moves only the functions that lived there
    moved = [f for f, h in homes.items() if h != "c" and rendezvous(f, ["a", "b"])[0] != h]
    assert moved == []


def test_front_routes_to_home_node_and_fails_over(two_agents_and_front):
    agents, front = two_agents_and_front
    agents[0].deploy(name="homed", handler=f"{H}:pid")
    # registry sync: the other node agent learns the function within a few seconds
    agents[1].wait(
        lambda: any(f["name"] == "homed" for f in agents[1].client.functions()),
        what="registry sync",
    )
    seen = {
        front.invoke("homed", b"{}", "application/json").headers["X-Hearth-Node-Agent"]
        for _ in range(5)
    }
    assert len(seen) == 1  # one home node: warm instances are reused
    home = seen.pop()
    dead = next(a for a in agents if a.url == home)
    dead.proc.kill()
    dead.proc.wait()
    r = front.invoke("homed", b"{}", "application/json")
    assert r.status == 200 and r.headers["X-Hearth-Node-Agent"] != home
    # a delete through the front reaches the survivor's registry too
    front.delete("homed")
    survivor = next(a for a in agents if a is not dead)
    survivor.wait(
        lambda: all(f["name"] != "homed" for f in survivor.client.functions()), what="undeploy sync"
    )


def test_front_without_agents_is_a_clear_error():
    env = {**os.environ, "HEARTH_PORT": str(free_port()), "HEARTH_NODE_AGENTS": ""}
    for role, says in (("gateway", "HEARTH_NODE_AGENTS"), ("boss", "--role must be")):
        r = subprocess.run(
            [sys.executable, "-m", "hearth.cli", "up", "--role", role],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1 and says in r.stderr, (role, r.stderr)


def test_the_front_listens_with_the_nodes_accept_backlog(tmp_path):
    """`hearth up --role gateway` listens with a 4,096 backlog (aiohttp's default is 128): a
    burst of new connections while its loop is busy (a failover) waits in the kernel instead
    of being dropped and retried by the clients' SYN timers."""
    from hearth.localnode import start_front

    front = start_front(tmp_path, [f"http://127.0.0.1:{free_port()}"])
    try:
        port = front.url.rsplit(":", 1)[1]
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert out[0] == "LISTEN" and int(out[2]) == 4096, out  # Send-Q of a listener: backlog
    finally:
        front.stop(10)


def test_the_fronts_process_loads_none_of_the_nodes_parts(tmp_path):
    """`hearth up --role gateway` imports the front and what it shares with a node
    (`hearth.process`), not the node (`hearth.up`: the node agent, its gateway, the queue
    triggers): about 100 fewer modules to load, and to freeze (`freeze_heap`), in the front."""
    from hearth.localnode import start_front

    front = start_front(
        tmp_path, [f"http://127.0.0.1:{free_port()}"], env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    front.stop(10)
    lines = (tmp_path / "front.log").read_text().splitlines()
    loaded = {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}
    assert "hearth.gateway.front" in loaded, lines[-20:]  # the imports were seen
    node = {"hearth.up", "hearth.node", "hearth.gateway.app", "hearth.triggers", "hearth.registry"}
    assert not sorted(loaded & node)
