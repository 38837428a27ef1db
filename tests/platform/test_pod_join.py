"""Instances that join the node agent (Kubernetes pods) instead of being spawned by it: a real
`hearth up` node, a separate `python -m hearth.runtime.pod` process (what an instance pod runs)
joining over the node socket, and invocations through the node's HTTP front that reach it over
the data plane and shared memory. Ready means registered: the ready file appears only once the
agent has the instance in its table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hearth.agent.join import JOIN_SOCKET
from joining import join_node, join_once
from realnode import wait_for

SPEC = {
    "name": "hello",
    "handler": "hearth.functions.examples.handlers:hello",
    "concurrency": 4,
    "max_instances": 2,
    "keep_alive": {"policy": "fixed", "ttl_s": 300},
}


def after_ticks(node, n: int) -> dict:
    """The agent's status once its lifecycle has made `n` more decisions than now."""
    start = node.client.status()["ticks"]
    return wait_for(
        lambda: (st := node.client.status())["ticks"] >= start + n and st, 30, f"{n} ticks"
    )


def pod(sock_dir: Path, iid: str, fn: str | None, ready: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HEARTH_NODE_SOCKET_DIR": str(sock_dir),
        "HEARTH_INSTANCE_ID": iid,
        "HEARTH_READY_FILE": str(ready),
    }
    env.pop("HEARTH_FUNCTION", None)
    if fn:
        env["HEARTH_FUNCTION"] = fn
    return subprocess.Popen(
        [sys.executable, "-m", "hearth.runtime.pod"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def node(tmp_path, redis_url):
    n = join_node(tmp_path, redis_url)
    yield n
    n.stop()


def instances(node, fn):
    st = node.client.status()["functions"].get(fn) or {}
    return [i for i in st.get("instances", []) if i["state"] not in ("stopping", "dead")]


def test_a_joined_pod_serves_and_its_exit_removes_it(node, tmp_path):
    assert oct((node.sock_dir / JOIN_SOCKET).stat().st_mode & 0o777) == "0o600"
    node.client.deploy(SPEC)
    ready = tmp_path / "ready-1"
    p = pod(node.sock_dir, "hello-pod-1", "hello", ready)
    try:
        wait_for(ready.exists, 60, "the joined instance to be registered")
        (inst,) = instances(node, "hello")
        assert inst["id"] == "hello-pod-1" and inst["pid"] is None  # not the agent's child
        for i in range(5):
            r = node.client.invoke(
                "hello", json.dumps({"name": f"n{i}"}).encode(), "application/json"
            )
            assert r.status == 200 and f"n{i}" in r.body.decode()
        (inst,) = instances(node, "hello")  # the agent started none of its own
        assert inst["id"] == "hello-pod-1" and inst["served"] == 5
        # the pod ends (e.g. deleted): the agent forgets it
        p.send_signal(signal.SIGTERM)
        p.wait(20)
        wait_for(
            lambda: not any(i["id"] == "hello-pod-1" for i in instances(node, "hello")),
            60,
            "removal",
        )
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_join_refused_for_unknown_function_or_bad_id(node, tmp_path, redis_url):
    p = pod(node.sock_dir, "ghost-1", "ghost", tmp_path / "r")
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 1 and "not deployed on this node" in out
    assert not (tmp_path / "r").exists()
    reply = join_once(node, b'{"instance_id": "Bad_ID", "function": null}\n')
    assert reply["error"] == "bad_join" and "instance_id" in reply["detail"]
    reply = join_once(node, b'{"instance_id": "raw-pool-0", "function": null, "owner": [1]}\n')
    assert reply == {
        "error": "bad_join",
        "detail": "owner: [pid, start time], a pid and a clock-tick count",
    }
    # an admitted pod's boot record holds what the runtime needs, no platform credential
    # (function code runs in that pod): neither the Redis URL (its password) nor a token
    boot = join_once(node, b'{"instance_id": "raw-pool-1", "function": null}\n')
    assert boot["instance_id"] == "raw-pool-1" and "proxy_socket" in boot
    text = json.dumps(boot)
    assert "redis_url" not in boot and redis_url not in text and "redis://" not in text
    assert node.token not in text and "HEARTH_" not in text


@pytest.mark.parametrize("kind", ["node", "pods_node"])
def test_a_pool_pod_joins_and_is_specialised_on_first_use(kind, request, tmp_path):
    """On an agent that also starts processes, and on one whose instances are pods only (its
    runner specialises a joined pool pod: HEARTH_INSTANCES=pods, as on Kubernetes)."""
    node = request.getfixturevalue(kind)
    ready = tmp_path / "ready-pool"
    p = pod(node.sock_dir, "pool-pod-1", None, ready)
    try:
        wait_for(ready.exists, 60, "the pool pod to be registered")
        node.client.deploy({**SPEC, "name": "hello2"})
        r = node.client.invoke("hello2", b'{"name": "pooled"}', "application/json")
        assert r.status == 200 and "pooled" in r.body.decode()
        ids = [i["id"] for i in instances(node, "hello2")]
        assert "pool-pod-1" in ids  # the joined pool instance was specialised, not a new one
        (inst,) = [i for i in instances(node, "hello2") if i["id"] == "pool-pod-1"]
        assert inst["from_pool"] is True
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def pods_node(tmp_path, redis_url):
    """A node agent whose instances are pods only (HEARTH_INSTANCES=pods, as on Kubernetes)."""
    # warm_pool=1: `hearth up`'s default: on Kubernetes pool pods are the controller's
    n = join_node(tmp_path, redis_url, {"HEARTH_INSTANCES": "pods"}, warm_pool=1)
    yield n
    n.stop()


def test_a_removed_pod_leaves_no_start_waiting_for_a_replacement(pods_node, tmp_path):
    """The pod of a function with recent traffic goes (deleted before its function): the agent
    does not sit waiting (60 s) for a replacement pod nobody asked for -- on Kubernetes starts are
    the controller's -- and deleting the function ends any wait for its pods at once."""
    node = pods_node
    # a few decision ticks: an agent-side warm pool would be waiting for a pod by then
    after_ticks(node, 3)
    assert node.client.status()["zygotes"]["waiting"] == 0
    node.client.deploy(SPEC)  # kept 300 s after use: the core would like one back
    ready = tmp_path / "ready-1"
    p = pod(node.sock_dir, "hello-pod-1", "hello", ready)
    try:
        wait_for(ready.exists, 60, "the joined instance to be registered")
        for _ in range(3):
            assert node.client.invoke("hello", b'{"name": "x"}', "application/json").status == 200
        p.send_signal(signal.SIGTERM)  # the pod is removed, its function stays
        p.wait(20)
        wait_for(lambda: not instances(node, "hello"), 60, "the agent forgot the pod")
        # a few decisions later: nothing waits for a pod of its own accord
        st = after_ticks(node, 3)
        assert st["functions"]["hello"]["starting"] == 0 and st["zygotes"]["waiting"] == 0, st
        # a request now is held for the next pod (the activator); the function's deletion ends
        # that wait at once with a clear error, not after the join timeout
        import threading

        from hearth.client import ClientError

        out: dict = {}

        def call():
            try:
                node.client.invoke("hello", b"{}", "application/json", timeout=120)
                out["ok"] = True
            except ClientError as e:
                out["status"] = e.status

        t = threading.Thread(target=call)
        t.start()
        wait_for(lambda: node.client.status()["zygotes"]["waiting"] == 1, 60, "the request held")
        t0 = time.monotonic()
        node.client.delete("hello")
        t.join(30)
        assert not t.is_alive() and out.get("status") == 404, out
        assert node.client.status()["zygotes"]["waiting"] == 0
        assert time.monotonic() - t0 < 30  # far below the 60 s join timeout
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
