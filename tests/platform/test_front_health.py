"""The front gateway's record of unreachable node agents (pure), and what it buys end to end:
a dead home node costs one failed connect, and a restarted one gets its work back."""

from __future__ import annotations

import time

from hearth.client import ClientError
from hearth.gateway.health import AgentHealth
from hearth.localnode import start_node
from hearth_proc import TOKEN

H = "hearth.functions.examples.handlers"


def test_agents_down_are_tried_last_and_come_back():
    h = AgentHealth(base_s=1.0, max_s=4.0)
    urls = ["a", "b", "c"]
    assert h.order(urls, 0.0) == urls
    h.failed("a", 0.0)
    assert h.order(urls, 0.5) == ["b", "c", "a"]  # still tried, last
    assert h.order(urls, 1.5) == urls  # backoff over: tried in its place again
    assert h.suspects() == ["a"]  # …and probed until it answers
    h.failed("a", 1.5)  # 2 s now
    assert h.is_down("a", 3.0) and not h.is_down("a", 3.6)
    for _ in range(5):
        h.failed("a", 10.0)
    assert h.down["a"] == (14.0, 4.0)  # capped at max_s
    h.ok("a")
    assert h.order(urls, 10.0) == urls and h.suspects() == []
    for u in urls:
        h.failed(u, 20.0)
    assert h.order(urls, 20.1) == urls  # all down: all still tried, in preference order


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
