"""The front gateway's record of unreachable node agents (pure), and what it buys end to end:
a dead home node costs one failed connect, and a restarted one gets its work back."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import signal
import socket
import threading
import time

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from hearth.client import ClientError
from hearth.gateway.connecting import to_abort
from hearth.gateway.front import Agents, make_front, rendezvous
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


def test_an_agent_marked_down_is_told_once_per_outage():
    """`on_down` (the front aborts the calls still connecting to it) hears of each outage once,
    whichever way the agent was taken down."""
    told: list[str] = []
    h = AgentHealth(on_down=lambda url, down: told.append(url) if url in down else None)
    assert h.failed("a", 1.0) and not h.failed("a", 2.0) and not h.lost("a", 2.5)
    h.ok("b", 3.0)
    assert not h.failed("b", 3.5, began=2.0)  # answered since: not down, nothing told
    assert h.lost("b", 4.0)
    h.ok("a", 5.0)
    assert h.failed("a", 6.0, began=5.5)
    assert told == ["a", "b", "a"]


def test_only_calls_with_an_agent_up_to_go_to_are_aborted():
    """An agent marked down: of the calls connecting to it, only those with an agent left to
    try that is not down are aborted; a call with nowhere else to go (a lone agent slow to
    accept, every other one down) connects on, since it may still connect."""
    a, b, c, d = "abcd"  # stand-ins for the calls' tasks
    calls = [(a, ["n2", "n3"]), (b, ["n2"]), (c, []), (d, ["n3", "n2"])]
    assert to_abort(calls, {"n1"}) == [a, b, d]
    assert to_abort(calls, {"n1", "n2"}) == [a, d]
    assert to_abort(calls, {"n1", "n2", "n3"}) == []


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


def _fill_accept_queue(port: int) -> list[socket.socket]:
    """Connections to a stopped process's listening port until its accept queue is full: a
    connect to it then hangs (its SYN is dropped), as to a node that stops answering."""
    import select

    socks: list[socket.socket] = []
    for _ in range(4096 + 64):  # (the node listens with a backlog of 4096)
        c = socket.socket()
        c.setblocking(False)
        socks.append(c)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        p = select.poll()
        p.register(c, select.POLLOUT)
        if not p.poll(500):
            return socks  # this one hangs: the queue is full
    for c in socks:
        c.close()
    raise AssertionError("the accept queue never filled")


async def test_calls_connecting_to_an_agent_marked_down_fail_over_at_once(redis_url, tmp_path):
    """A node agent stops answering (SIGSTOP, its accept queue full: connects to it hang). The
    first call's connect times out and marks it down; a call that was already connecting to it
    then fails over at once, instead of waiting out its own connect timeout (2 s by default)."""
    connect_s = 6.0
    token = "front-connect-token-1"
    nodes = await asyncio.gather(
        *(
            asyncio.to_thread(start_node, tmp_path / f"n{i}", redis_url=redis_url, token=token)
            for i in range(2)
        )
    )
    path = "/v1/functions"
    home_url, other_url = rendezvous(path, [n.url for n in nodes])
    home = next(n for n in nodes if n.url == home_url)
    front = TestServer(make_front(Agents(",".join(n.url for n in nodes)), connect_s=connect_s))
    await front.start_server()
    hung: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:

            async def call() -> tuple[int, str, float]:
                t0 = time.monotonic()
                async with s.get(str(front.make_url(path))) as r:
                    await r.read()
                    return r.status, r.headers["X-Hearth-Node-Agent"], time.monotonic() - t0

            assert (await call())[:2] == (200, home_url)
            home.proc.send_signal(signal.SIGSTOP)
            hung = await asyncio.to_thread(_fill_accept_queue, int(home_url.rsplit(":", 1)[1]))
            first = asyncio.create_task(call())  # connects to the home node: hangs
            await asyncio.sleep(connect_s / 2)
            second = asyncio.create_task(call())  # connecting too when the first times out
            assert (await first)[:2] == (200, other_url)  # after its connect timeout
            status, served, _ = await asyncio.wait_for(second, 2 * connect_s)
            assert (status, served) == (200, other_url)
            # it failed over when the first marked the agent down: its connect was aborted (not
            # timed out after its own bound, which would also end on the other node)
            assert (await _front_health(s, front))["connects_aborted"] == 1
    finally:
        home.proc.send_signal(signal.SIGCONT)
        for c in hung:
            c.close()
        await asyncio.wait_for(front.close(), 10.0)
        for n in nodes:
            await asyncio.to_thread(n.stop)


async def _front_health(s: aiohttp.ClientSession, front: TestServer) -> dict:
    async with s.get(str(front.make_url("/healthz"))) as r:
        return await r.json()


async def test_a_lone_agent_slow_to_accept_keeps_its_connecting_calls(redis_url, tmp_path):
    """The only node agent stops accepting (SIGSTOP, its accept queue full); the first call's
    connect times out and marks it down. A call still connecting to it then has nowhere else to
    go: it is not aborted (a 502 at once, `ConnectAborted`) but connects on, and once the agent
    accepts again within that call's connect bound, it is answered.

    Its SYN was dropped (the full queue), so it connects on a retransmission: Linux resends
    1, 3 and 7 s after the connect began. The second call begins 1.5 s before the first's
    connect times out, and the agent is let go as soon as that happens: the 1 s resend is
    lost whatever the timing (the agent is still stopped), and the 3 s one comes 1.5 s after
    the agent is let go -- room for the agent to accept once (it frees its whole queue in its
    first loop pass) and for the jitter of a loaded machine, not a race with the 1 s resend
    as when the second call began 0.5 s before; the 7 s resend comes within the bound (10 s)
    too. (The black hole cannot be lifted without a resend: loopback has no delay to lift
    instead.)"""
    connect_s = 10.0
    token = "front-connect-token-2"
    node = await asyncio.to_thread(start_node, tmp_path / "n0", redis_url=redis_url, token=token)
    front = TestServer(make_front(Agents(node.url), connect_s=connect_s))
    await front.start_server()
    hung: list[socket.socket] = []
    stopped = False
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:

            async def call() -> tuple[int, str | None, dict]:
                async with s.get(str(front.make_url("/v1/functions"))) as r:
                    body = await r.json()
                    return r.status, r.headers.get("X-Hearth-Node-Agent"), body

            assert (await call())[:2] == (200, node.url)
            node.proc.send_signal(signal.SIGSTOP)
            stopped = True
            hung = await asyncio.to_thread(_fill_accept_queue, int(node.url.rsplit(":", 1)[1]))
            first = asyncio.create_task(call())  # its connect hangs, then times out
            await asyncio.sleep(connect_s - 1.5)
            second = asyncio.create_task(call())  # connecting when the first marks it down
            status, _, body = await first
            assert status == 502 and "ConnectionTimeoutError" in body["detail"]
            assert node.url in (await _front_health(s, front))["down"]
            assert not second.done()  # not aborted: it connects on
            for c in hung:  # the agent accepts again: the second call's SYN gets through
                c.close()
            node.proc.send_signal(signal.SIGCONT)
            stopped = False
            status, served, body = await asyncio.wait_for(second, 2 * connect_s)
            assert (status, served) == (200, node.url), body
            assert (await _front_health(s, front))["connects_aborted"] == 0
    finally:
        if stopped:
            node.proc.send_signal(signal.SIGCONT)
        for c in hung:
            c.close()
        await asyncio.wait_for(front.close(), 10.0)
        await asyncio.to_thread(node.stop)
