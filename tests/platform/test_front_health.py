"""The front gateway's record of unreachable node agents (pure), and what it buys end to end:
a dead home node costs one failed connect, and a restarted one gets its work back."""

from __future__ import annotations

import time

from hearth.client import ClientError
from hearth.gateway.health import AgentHealth
from hearth.localnode import start_node
from hearth_proc import TOKEN

H = "hearth.functions.examples.handlers"


def test_agents_down_are_tried_last_until_they_answer():
    h = AgentHealth()
    urls = ["a", "b", "c"]
    assert h.order(urls, 0.0) == urls
    h.failed("a", 0.0)
    assert h.order(urls, 0.5) == ["b", "c", "a"]  # still tried, last
    assert h.suspects() == ["a"]  # ...and probed until it answers
    # a probe of a dead address takes its whole connect timeout (2 s) to fail: meanwhile the
    # agent stays down (a backoff of 1 s ran out here and put it first again)
    assert h.order(urls, 1.2) == ["b", "c", "a"] and h.order(urls, 2.9) == ["b", "c", "a"]
    # however long its probes keep failing, it is never first again in between: a dead home
    # node that came back first for a moment took the calls of that moment into its connect
    # timeout, then they all failed over at once
    for t in (1.0, 1.5, 3.0, 60.0):
        h.failed("a", t)
        assert h.order(urls, t + 0.9) == ["b", "c", "a"] and h.is_down("a", t + 0.9)
    assert h.down["a"] == 0.0  # down since its first failure
    h.ok("a")  # a probe (or a call) got an answer
    assert h.order(urls, 61.0) == urls and h.suspects() == [] and not h.is_down("a", 61.0)
    for u in urls:
        h.failed(u, 70.0)
    assert h.order(urls, 70.1) == urls  # all down: all still tried, in preference order


def test_front_returns_work_to_a_restarted_home_node(two_agents_and_front, redis_url):
    agents, front = two_agents_and_front
    agents[0].deploy(name="homed", handler=f"{H}:hello")
    for a in agents:
        a.wait(lambda a=a: any(f["name"] == "homed" for f in a.client.functions()), what="sync")
    home = front.invoke("homed", b"{}", "application/json").headers["X-Hearth-Node-Agent"]
    dead = next(a for a in agents if a.url == home)
    port = int(home.rsplit(":", 1)[1])
    dead.proc.kill()
    dead.proc.wait()
    served = [
        front.invoke("homed", b"{}", "application/json").headers["X-Hearth-Node-Agent"]
        for _ in range(5)
    ]
    assert home not in served
    assert front.request("GET", "/healthz").json()["down"] == [home]
    again = start_node(
        dead.state,
        redis_url=redis_url,
        token=TOKEN,
        dataplane="unix",
        port=port,
        env={"HEARTH_NODE": "node-again"},
    )
    try:
        t0 = time.monotonic()
        while front.request("GET", "/healthz").json()["down"] and time.monotonic() - t0 < 30:
            time.sleep(0.1)  # the front probes the agents it saw fail about once a second
        assert front.request("GET", "/healthz").json()["down"] == []
        again_served, t0 = None, time.monotonic()
        while time.monotonic() - t0 < 60:  # it learns the function from the registry, starts one
            try:
                r = front.invoke("homed", b"{}", "application/json")
            except ClientError:
                time.sleep(0.1)
                continue
            again_served = r.headers["X-Hearth-Node-Agent"]
            break
        assert again_served == home
    finally:
        again.stop()
