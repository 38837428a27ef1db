"""The front gateway's record of unreachable node agents (pure), and what it buys end to end:
a dead home node costs one failed connect, and a restarted one gets its work back."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import socket
import threading
import time

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from hearth.client import ClientError
from hearth.gateway.front import Agents, make_front
from hearth.gateway.health import AgentHealth
from hearth.localnode import start_node
from hearth.redis_server import free_port
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
    assert h.ok("a", 61.0)  # a probe (or a call) got an answer: it was down until now
    assert h.order(urls, 61.0) == urls and h.suspects() == [] and not h.is_down("a", 61.0)
    for u in urls:
        h.failed(u, 70.0)
    assert h.order(urls, 70.1) == urls  # all down: all still tried, in preference order


def test_front_returns_work_to_a_restarted_home_node(two_agents_and_front, redis_url):
    """The home agent is killed with a call on it, after answering another call begun later (the
    sequence above, end to end): that call is a 503 `node_agent_lost` and the front lists the
    agent down at once, before any call connects to it again or any probe (it probes only agents
    with a failure on record). Then calls go elsewhere, and the agent restarted gets them back."""
    agents, front = two_agents_and_front
    agents[0].deploy(name="homed", handler=f"{H}:sleep", max_instances=2)
    for a in agents:
        a.wait(lambda a=a: any(f["name"] == "homed" for f in a.client.functions()), what="sync")
    quick = b'{"seconds": 0}'
    home = front.invoke("homed", quick, "application/json").headers["X-Hearth-Node-Agent"]
    dead = next(a for a in agents if a.url == home)
    port = int(home.rsplit(":", 1)[1])
    lost: list[ClientError] = []

    def long_call() -> None:
        try:
            front.invoke("homed", b'{"seconds": 60}', "application/json")
        except ClientError as e:
            lost.append(e)

    th = threading.Thread(target=long_call, daemon=True)
    th.start()
    dead.wait(lambda: dead.client.status()["pool"]["used"] > 0, what="the long call running")
    # answered after the long call began (a second instance): "alive" by the connect rule
    assert front.invoke("homed", quick, "application/json").headers["X-Hearth-Node-Agent"] == home
    assert front.request("GET", "/healthz").json()["down"] == []
    dead.proc.kill()
    dead.proc.wait()
    th.join(30)
    assert [e.status for e in lost] == [503] and b"node_agent_lost" in lost[0].body
    assert front.request("GET", "/healthz").json()["down"] == [home]
    served = [
        front.invoke("homed", quick, "application/json").headers["X-Hearth-Node-Agent"]
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
                r = front.invoke("homed", quick, "application/json")
            except ClientError:
                time.sleep(0.1)
                continue
            again_served = r.headers["X-Hearth-Node-Agent"]
            break
        assert again_served == home
    finally:
        again.stop()


def test_a_front_stalled_on_its_side_does_not_take_down_an_agent_that_answers():
    """CI rehearsal 11, scenario (d): after the home node died, the front's loop stalled in the
    failover burst and connects to the live node timed out on the front's side; the live node
    was marked down too, every agent was "down", calls went back to the dead home node first,
    waited out its connect timeout, and it went on to the end of the run. Now a connect failure
    does not take down an agent that answered a call after that attempt began, and when all
    are down the one that answered last is tried first."""
    h = AgentHealth()
    urls = ["home", "live"]  # the function's home first
    assert h.ok("home", 5.9) is False and h.ok("live", 1.0) is False  # both up: no news
    assert h.failed("home", 8.0, began=6.0)  # killed at 6.0: its connects time out at 8.0
    assert h.order(urls, 8.0) == ["live", "home"]
    h.ok("live", 8.3)  # the failover burst is served...
    # ...while one of its connects, begun at 8.1, timed out on the stalled front's side
    assert h.failed("live", 10.1, began=8.1) is False
    assert h.order(urls, 10.1) == ["live", "home"] and not h.is_down("live", 10.1)
    # a connect begun after its last answer is evidence: then it is down
    assert h.failed("live", 12.6, began=10.6) and h.is_down("live", 12.6)
    # every agent down: the one that answered last first, not the dead home node
    assert h.order(urls, 12.6) == ["live", "home"]
    assert h.failed("live", 13.0) is False  # already down: not news (logged once per outage)
    assert h.ok("live", 13.1) is True and h.order(urls, 13.1) == ["live", "home"]


def test_a_call_lost_mid_request_takes_its_agent_down_at_once():
    """CI rehearsal 24, scenario (d): the home node died with a hundred calls queued on it. Each
    was lost mid-request, but each had begun before the node's last answer, so by the connect
    rule none took it down; the calls that came next each waited out their connect timeout to
    the dead container's address before failing over, all at once. A loss is the agent's own
    doing: it takes the agent down when it is seen, whatever the agent answered before."""
    h = AgentHealth()
    urls = ["home", "live"]
    h.ok("home", 7.9)  # answers until it dies at 8.0: under load, every call began earlier
    assert h.failed("home", 8.0, began=5.0) is False  # the connect rule: no evidence
    assert h.lost("home", 8.0) and h.is_down("home", 8.0)
    assert h.order(urls, 8.0) == ["live", "home"]
    assert h.lost("home", 8.01) is False  # the other losses of that moment: not news
    assert h.ok("home", 9.0) is True  # a live agent that dropped one connection: up again
    assert h.order(urls, 9.0) == urls


def test_agents_no_longer_listed_are_forgotten():
    """A removed agent (a node taken out, a pod's old address behind `dns+`) is not probed for
    ever: the record keeps only the agents the front still lists."""
    h = AgentHealth()
    for u in ("a", "b", "c"):
        h.failed(u, 0.0)
    h.keep_only(["b", "c", "d"])
    assert h.suspects() == ["b", "c"]
    h.ok("d", 1.0)
    h.keep_only([])
    assert h.suspects() == [] and h.down == {} and h.answered == {}


async def test_a_hung_probe_does_not_hold_back_an_agent_that_answers():
    """Probes run side by side: an agent that came back is taken back within a probe period even
    while the probe of another (dead, its connect hanging) waits out its connect timeout."""
    dead_port, live_port = free_port(), free_port("127.0.0.2")  # both refuse for now
    # suspects are probed in sorted order: the dead one first
    dead_url, live_url = f"http://127.0.0.1:{dead_port}", f"http://127.0.0.2:{live_port}"
    agents = Agents(f"{dead_url},{live_url}")
    front = TestServer(make_front(agents, connect_s=30.0, probe_s=0.05))
    await front.start_server()
    live = None
    hung: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(str(front.make_url("/v1/functions/f:invoke")), data=b"{}") as r:
                assert r.status == 502  # both refused
            async with s.get(str(front.make_url("/healthz"))) as r:
                assert sorted((await r.json())["down"]) == [dead_url, live_url]
            hung = _hung_listener_on(dead_port)
            await asyncio.sleep(0.5)  # the probe of the dead agent now hangs (30 s)

            async def healthz(_r: web.Request) -> web.Response:
                return web.json_response({"status": "ok"})

            app = web.Application()
            app.router.add_get("/healthz", healthz)
            live = web.AppRunner(app)
            await live.setup()
            await web.TCPSite(live, "127.0.0.2", live_port).start()
            down: list[str] = []
            for _ in range(100):  # ~0.1 s expected; a probe behind the hung one waits 30 s
                async with s.get(str(front.make_url("/healthz"))) as r:
                    down = (await r.json())["down"]
                if down == [dead_url]:
                    break
                await asyncio.sleep(0.05)
            assert down == [dead_url]
    finally:
        # the front's stop ends its probes, the hung one included
        await asyncio.wait_for(front.close(), 5.0)
        if live is not None:
            await live.cleanup()
        for c in hung:
            c.close()


def _hung_listener_on(port: int) -> list[socket.socket]:
    """A loopback port whose accept queue is full: a connect to it hangs (its SYN is dropped),
    as to a node that died without refusing. The listener, then the connections filling it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(0)
    socks = [s]
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        socks.append(c)
    return socks


def test_front_passes_a_functions_redirect_through(two_agents_and_front, tmp_path):
    """A function's 3xx goes back to its client as it is: the front is a proxy, it must not
    follow it. Following it let any function's code send the front's requests (the body of a
    307 included) to any address it named, and look up any host name it chose (each a thread
    and an entry of the front's name record, never dropped)."""
    agents, front = two_agents_and_front
    code = tmp_path / "code"
    code.mkdir()
    (code / "redir.py").write_text(
        "from hearth.sdk import Response\n\n\n"
        "def handle(event):\n"
        "    return Response(b'moved', status=307, headers={'Location': event.text()})\n"
    )
    hits: list[str] = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_a) -> None:
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    to = f"http://127.0.0.1:{target.server_address[1]}/stolen"
    try:
        agents[0].deploy(name="redir", handler="redir:handle", code_path=str(code))
        for a in agents:
            a.wait(lambda a=a: any(f["name"] == "redir" for f in a.client.functions()), what="sync")
        host, port = front.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request(
            "POST",
            "/v1/functions/redir:invoke",
            body=to.encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"},
        )
        r = conn.getresponse()
        assert (r.status, r.getheader("Location"), r.read()) == (307, to, b"moved")
        assert "X-Hearth-Node-Agent" in r.headers  # answered by a node agent, through the front
        assert hits == []  # the front did not follow it
    finally:
        target.shutdown()
        target.server_close()
