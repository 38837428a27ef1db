"""`hearth status` through the front gateway: every node agent's status (the front asks them all,
`hearth.gateway.fanout`), the client's token checked by the agents as for their own /v1/status,
and an agent that does not answer listed with its error instead of failing or holding back the
answer. Two real node agents behind a real front (`two_agents_and_front`)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from hearth_proc import TOKEN, run_cli, stop_hearth

H = "hearth.functions.examples.handlers"


def _hearth_status(url: str, token: str) -> subprocess.CompletedProcess:
    """`hearth status` in a child process aimed at `url`."""
    return run_cli(["status"], {**os.environ, "HEARTH_URL": url, "HEARTH_ADMIN_TOKEN": token})


def test_hearth_status_through_the_front_shows_every_node(two_agents_and_front):
    agents, front = two_agents_and_front
    agents[1].deploy(name="shown", handler=f"{H}:echo", min_instances=1)
    agents[1].wait(lambda: agents[1].instances("shown"), what="an instance on node-1")
    nodes = front.status()["nodes"]
    assert sorted(nodes) == sorted(a.url for a in agents)
    assert {u: n["node"] for u, n in nodes.items()} == {
        a.url: f"node-{i}" for i, a in enumerate(agents)
    }
    r = _hearth_status(front.url, TOKEN)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for i, a in enumerate(agents):  # each node's block, headed by its agent's URL
        head = lines.index(f"agent {a.url}:")
        assert lines[head + 1].startswith(f"node node-{i}  data plane: unix")
    heads = sorted(lines.index(f"agent {a.url}:") for a in agents)
    first = lines[heads[0] : heads[1]]
    second = lines[heads[1] :]
    block1 = first if first[0] == f"agent {agents[1].url}:" else second
    # node-1's instance, in node-1's block (the same lines as `hearth status` at node-1)
    own1 = _hearth_status(agents[1].url, TOKEN)
    assert own1.returncode == 0, own1.stderr
    shown = [ln for ln in own1.stdout.splitlines() if ln.startswith("  shown: ")]
    assert len(shown) == 1 and "(pid " in shown[0] and shown[0] in block1
    # a node agent's own answer is unchanged: one node, no "nodes"
    own = agents[0].client.status()
    assert own["node"] == "node-0" and "nodes" not in own


def test_front_status_needs_the_admin_token(two_agents_and_front):
    """The token goes to the agents, which check it as for their own /v1/status: no token is
    their 401, a wrong one their 403, never a 200 with the refusals merged in."""
    agents, front = two_agents_and_front
    none = front.request("GET", "/v1/status", ok=(200, 401, 403))
    assert none.status == 401 and "nodes" not in none.json()
    wrong = front.request("GET", "/v1/status", token="not-the-token", ok=(200, 401, 403))
    assert wrong.status == 403 and "nodes" not in wrong.json()
    r = _hearth_status(front.url, "not-the-token")
    assert r.returncode != 0 and "403" in (r.stdout + r.stderr)
    right = front.request("GET", "/v1/status", admin=True)
    assert right.status == 200 and sorted(right.json()["nodes"]) == sorted(a.url for a in agents)


def test_an_agent_that_does_not_answer_is_listed_with_its_error(two_agents_and_front):
    """A stopped agent (SIGSTOP: connects succeed, nothing answers) is listed as a timeout after
    the front's bound (its connect timeout, 2 s, + 2 s); a dead one (refusing) at once. The
    other node is shown either way."""
    agents, front = two_agents_and_front
    live, stuck = agents
    stuck.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        nodes = front.status()["nodes"]
        took = time.monotonic() - t0
    finally:
        stuck.proc.send_signal(signal.SIGCONT)
    assert nodes[live.url]["node"] == "node-0"
    assert nodes[stuck.url]["error"] == "timeout", nodes[stuck.url]
    assert 3.5 < took < 8.0, took  # its bound (4 s), not the front's call timeout (300 s)
    stop_hearth(stuck)
    t0 = time.monotonic()
    r = _hearth_status(front.url, TOKEN)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30  # an interpreter start included, on a loaded machine
    assert f"agent {stuck.url}: no status (unreachable: " in r.stdout
    assert f"agent {live.url}:\nnode node-0  data plane: unix" in r.stdout
    t0 = time.monotonic()
    nodes = front.status()["nodes"]
    assert time.monotonic() - t0 < 2.0  # refused: no wait
    assert nodes[stuck.url]["error"] == "unreachable" and nodes[live.url]["node"] == "node-0"


def test_no_agent_answering_is_a_503_that_says_nothing_of_the_nodes(two_agents_and_front):
    """With every agent gone no agent checks the client's token: the front answers 503
    `no_node_agents`, token or not, with no node's entry (before: 200 with the errors)."""
    import json
    import urllib.error
    import urllib.request

    import pytest

    agents, front = two_agents_and_front
    for a in agents:
        stop_hearth(a)
    for auth in ({"Authorization": f"Bearer {TOKEN}"}, {}):
        req = urllib.request.Request(front.url + "/v1/status", headers=auth)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        body = json.loads(e.value.read())
        assert e.value.code == 503 and body["error"] == "no_node_agents", body
        assert "nodes" not in body, body
