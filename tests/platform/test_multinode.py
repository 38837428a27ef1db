"""Several real node agents (`hearth up`, each its own state dir, pool and data plane) sharing one
Redis, joined by the agent-to-agent link: invocations and chained calls cross nodes with the right
bytes, refusals keep their status, a node that vanishes mid-call gives 503 naming it, its functions
are placed again on live nodes, and no slot is left behind on any node."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hearth.client import ClientError
from hearth.controller.placement import NODE_HINT
from hearth_proc import start_hearth, stop_hearth
from test_gateway_fastpath import _invoke, _Reader

H = "hearth.functions.examples.handlers"
CLUSTER_TOKEN = "cluster-test-token-0123456789abcdef"


def cluster_env(node: str) -> dict[str, str]:
    return {
        "HEARTH_NODE": node,
        "HEARTH_CLUSTER_TOKEN": CLUSTER_TOKEN,
        "HEARTH_HEARTBEAT_S": "0.3",
        "HEARTH_MAX_BODY_BYTES": str(80 << 20),
        "HEARTH_POOL_CLASSES": "64KiB:1024,1MiB:64,16MiB:8,80MiB:6",
    }


def start_nodes(tmp_path, redis_url, names, modes=None):
    out = {}
    for _i, n in enumerate(names):
        (tmp_path / n).mkdir()
        mode = (modes or {}).get(n, "unix")
        out[n] = start_hearth(tmp_path / n, redis_url, mode, cluster_env(n))
    return out


def cluster_status(h) -> dict:
    return h.client.status()["cluster"]


def wait_joined(nodes: dict, functions: list[str] = ()) -> None:
    """Every node sees every peer, knows `functions` and has them in its placement."""
    for h in nodes.values():
        h.wait(
            lambda h=h: (
                set(cluster_status(h)["peers"]) == set(nodes)
                and all(f in cluster_status(h)["placement"] for f in functions)
                and set(functions) <= {f["name"] for f in h.client.functions()}
            ),
            timeout=30,
            what="peers and placement",
        )
    for h in nodes.values():  # and routes them to a planned host: the peers announced them
        h.wait(
            lambda h=h: all(
                cluster_status(h)["routes"].get(f) in cluster_status(h)["placement"][f]
                for f in functions
            ),
            timeout=30,
            what="routes to the planned hosts",
        )


def pool_used(h) -> int:
    return h.client.status()["pool"]["used"]


def wait_no_slot_used(nodes: dict, undeploy: list[str] = ()) -> None:
    """No slot left in use on any node. Instances may hold buffers of their own (ctx.alloc:
    accumulators, kept models): `undeploy` stops those functions first, their slots go back."""
    for fn in undeploy:
        next(iter(nodes.values())).client.delete(fn)
    for name, h in nodes.items():
        h.wait(lambda h=h: pool_used(h) == 0, timeout=15, what=f"no slot in use on {name}")


def pinned(name: str, handler: str, node: str, **kw) -> dict:
    return {"name": name, "handler": f"{H}:{handler}", "labels": {NODE_HINT: node}, **kw}


@pytest.fixture
def two_nodes(redis_url, tmp_path):
    modes = {"node-a": "ebpf"} if os.geteuid() == 0 else {}
    nodes = start_nodes(tmp_path, redis_url, ["node-a", "node-b"], modes)
    yield nodes
    for h in nodes.values():
        if h.proc.poll() is None:
            stop_hearth(h)


def test_chained_call_crosses_two_nodes_with_the_right_bytes(two_nodes):
    a, b = two_nodes["node-a"], two_nodes["node-b"]
    a.deploy(**pinned("relay", "relay", "node-a"))
    a.deploy(**pinned("echo", "echo", "node-b"))
    wait_joined(two_nodes, ["relay", "echo"])
    for size in (1024, 64 << 20):
        body = os.urandom(size)
        r = a.client.invoke("relay", body)  # relay → echo (its default target)
        assert r.status == 200
        assert (
            len(r.body) == size and hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
        )
    # the relay ran on node a, echo on node b: only b has echo instances, only a has relay ones
    assert a.instances("relay") and not a.instances("echo")
    assert b.instances("echo") and not b.instances("relay")
    sent = cluster_status(a)["bytes"]["sent_by_function"]
    assert sent["echo"] == 1024 + (64 << 20)  # each payload crossed once, a → b
    # a direct invocation of echo at node a is forwarded too (HTTP → slot → link → slot)
    r = a.client.invoke("echo", b"straight", "text/plain")
    assert r.status == 200 and r.body == b"straight"
    assert r.headers["X-Hearth-Instance"].startswith("node-b/")
    # node b sent the small replies on from its reader callback, straight from the reply slot
    # (the 64 MiB one is too big for that and went the task's way)
    assert cluster_status(b)["bytes"]["early_replies"] >= 1
    metrics = a.client.request("GET", "/metrics", admin=True).body.decode()
    line = re.search(
        r'^hearth_cluster_forwarded_bytes_total\{function="echo"\} (\S+)$', metrics, re.M
    )
    assert line and float(line.group(1)) == 1024 + (64 << 20) + len(b"straight"), metrics[-800:]
    # pipelined on one connection: node a's gateway sends each call of echo on with no task
    # and answers it from the link's callback; answers keep request order, whatever runs where
    started = cluster_status(a)["bytes"]["started"]
    asks = [("echo", b"p0"), ("relay", b"p1"), ("echo", b"p2"), ("echo", b"p3"), ("relay", b"p4")]
    with socket.create_connection(("127.0.0.1", int(a.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(b"".join(_invoke(fn, body, Content_Type="text/plain") for fn, body in asks))
        r = _Reader(s)
        got = [r.response() for _ in asks]
    assert [(st, body) for st, _h, body in got] == [(200, body) for _fn, body in asks]
    assert [h["x-hearth-instance"][:7] == "node-b/" for _st, h, _b in got] == [
        fn == "echo" for fn, _b in asks
    ]
    assert cluster_status(a)["bytes"]["started"] >= started + 3
    # and node b served them without a task too (the agent's warm call, books closed after)
    assert cluster_status(b)["bytes"]["served_now"] >= 3
    wait_no_slot_used(two_nodes)


def test_refusals_from_the_remote_node_keep_their_status(two_nodes):
    a, b = two_nodes["node-a"], two_nodes["node-b"]
    a.deploy(**pinned("nap", "sleep", "node-b", max_instances=1, concurrency=1, queue_size=0))
    a.deploy(**pinned("picky", "reject", "node-b"))
    odd = {"handler": "fastpath_handlers:odd_type", "code_path": str(Path(__file__).parent)}
    a.deploy(**{**pinned("odd", "hello", "node-b"), **odd})
    wait_joined(two_nodes, ["nap", "picky", "odd"])
    for _ in range(2):  # cold (node b's task), then warm (its early reply): 502 as on one node
        with pytest.raises(ClientError) as e:
            a.client.invoke("odd", b"{}", "application/json")
        assert e.value.status == 502 and "bad_reply" in str(e.value), e.value
    started = cluster_status(a)["bytes"]["started"]
    with pytest.raises(ClientError) as e:
        a.client.invoke("picky", b"{}", "application/json")
    assert e.value.status == 422  # the handler's own status, from node b
    assert a.client.invoke("nap", b'{"seconds": 0}', "application/json").status == 200  # warm
    with ThreadPoolExecutor(2) as ex:
        slow = ex.submit(a.client.invoke, "nap", b'{"seconds": 3}', "application/json")
        b.wait(lambda: b.instances("nap")[0]["inflight"] == 1, what="nap busy on node-b")
        with pytest.raises(ClientError) as e:
            a.client.invoke("nap", b'{"seconds": 0}', "application/json")
        assert e.value.status == 429, e.value  # node b is full: 429 reaches the caller
        assert slow.result().status == 200
    # answered from node a's link callback (the gateway forwarded them without a task), all
    # but the first, which dialled the link in its task
    assert cluster_status(a)["bytes"]["started"] >= started + 3
    wait_no_slot_used(two_nodes)


def test_a_node_that_vanishes_mid_call_gives_503_naming_it_then_work_moves(two_nodes, redis_url):
    a, b = two_nodes["node-a"], two_nodes["node-b"]
    a.deploy(**pinned("nap", "sleep", "node-b", timeout_s=60))
    wait_joined(two_nodes, ["nap"])
    assert a.client.invoke("nap", b'{"seconds": 0}', "application/json").status == 200
    with ThreadPoolExecutor(1) as ex:
        t0 = time.monotonic()
        call = ex.submit(a.client.invoke, "nap", b'{"seconds": 40}', "application/json")
        time.sleep(1.0)
        os.kill(b.proc.pid, signal.SIGSTOP)  # frozen: no FIN, no RST, just silence
        try:
            with pytest.raises(ClientError) as e:
                call.result(timeout=50)
            took = time.monotonic() - t0
        finally:
            os.kill(b.proc.pid, signal.SIGKILL)
            os.kill(b.proc.pid, signal.SIGCONT)
            b.proc.wait(10)
    assert e.value.status == 503 and "node-b" in str(e.value), e.value
    assert took < 30  # the 40 s call failed as soon as the peer was found dead
    # node b's registration expires; the placement moves `nap` to the live node
    a.wait(
        lambda: cluster_status(a)["placement"].get("nap") == ["node-a"],
        timeout=20,
        what="nap placed again on node-a",
    )
    r = a.client.invoke("nap", b'{"seconds": 0}', "application/json")
    assert r.status == 200 and not r.headers["X-Hearth-Instance"].startswith("node-b/")
    a.wait(lambda: pool_used(a) == 0, timeout=15, what="no slot in use on node-a")
    # node b restarts (a new process, a new boot id): it rejoins and its pinned function goes back
    tmp = b.state.parent / "node-b-again"
    tmp.mkdir()
    two_nodes["node-b"] = b = start_hearth(tmp, redis_url, "unix", cluster_env("node-b"))
    wait_joined(two_nodes, ["nap"])
    a.wait(
        lambda: cluster_status(a)["placement"].get("nap") == ["node-b"],
        timeout=20,
        what="nap placed on node-b again",
    )
    r = a.client.invoke("nap", b'{"seconds": 0}', "application/json")
    assert r.status == 200 and r.headers["X-Hearth-Instance"].startswith("node-b/")
    wait_no_slot_used(two_nodes)


def test_queue_events_for_a_function_on_another_node_are_forwarded_and_none_is_lost(
    two_nodes, redis_url
):
    """Both nodes consume the stream (one consumer group); events that node a takes run on
    node b, where the function lives; every event is served once."""
    import redis
    from hearth.queue.producer import publish_sync

    a, b = two_nodes["node-a"], two_nodes["node-b"]
    a.deploy(
        **pinned(
            "tally", "pid", "node-b", triggers=[{"type": "redis-stream", "stream": "xn:tally"}]
        )
    )
    wait_joined(two_nodes, ["tally"])
    r = redis.Redis.from_url(redis_url)
    n = 40
    for i in range(n):  # a trickle: the two nodes' consumers (blocked reads, FIFO) share it
        publish_sync(r, "xn:tally", f'{{"i": {i}}}'.encode(), "application/json")
        time.sleep(0.02)
    b.wait(
        lambda: sum(i["served"] for i in b.instances("tally")) >= n,
        timeout=60,
        what="every event served on node b",
    )
    time.sleep(1.0)
    assert sum(i["served"] for i in b.instances("tally")) == n  # once each, none lost
    assert not a.instances("tally")
    forwarded = cluster_status(a)["bytes"]["calls_by_function"].get("tally", 0)
    assert forwarded > 0  # node a's consumer took some events and sent them over the link
    wait_no_slot_used(two_nodes)
