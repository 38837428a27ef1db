"""The node agent's registry sync and its own admin API act on one registry: a sync working from
a read taken before an admin delete must not deploy the deleted function again (it did: the
sync's read was stale while it drained another function's instance, and the function came back
for a second -- with its triggers, and a start that could take a pod meant for another one).
Real `hearth up`, real Redis, real instance processes."""

from __future__ import annotations

import threading
import time

import redis
from hearth.localnode import start_node
from hearth.registry import KEY

SLEEP = "hearth.functions.examples.handlers:sleep"


def wait(cond, what, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_admin_delete_during_a_slow_sync_stays_deleted(tmp_path, redis_url):
    node = start_node(tmp_path / "state", redis_url=redis_url, dataplane="unix")
    r = redis.Redis.from_url(redis_url)
    try:
        c = node.client
        c.deploy({"name": "slow", "handler": SLEEP, "timeout_s": 60})
        c.deploy({"name": "victim", "handler": "hearth.functions.examples.handlers:hello"})
        names = lambda: {f["name"] for f in c.functions()}  # noqa: E731
        wait(lambda: names() >= {"slow", "victim"}, "both deployed")
        time.sleep(1.5)  # a sync round has seen both: they are the registry's now
        # a long invocation keeps `slow`'s instance busy
        t = threading.Thread(
            target=c.invoke, args=("slow", b'{"seconds": 4}', "application/json"), daemon=True
        )
        t.start()
        wait(
            lambda: (c.status()["functions"]["slow"]["instances"] or [{}])[0].get("inflight") == 1,
            "busy",
        )
        # `slow` leaves the registry behind this agent's back (another node's admin API): the
        # next sync undeploys it here, draining the busy instance for seconds, with its read of
        # the registry -- which still lists `victim` -- in hand
        r.hdel(KEY, "slow")
        wait(lambda: "slow" not in names(), "the sync undeploying slow")
        c.delete("victim")
        assert r.hget(KEY, "victim") is None
        # it must stay gone: watch for well over a sync round after the drain ends
        seen = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 7:
            seen |= names()
            time.sleep(0.05)
        assert "victim" not in seen, "a stale registry read deployed the deleted function again"
        t.join(30)
    finally:
        r.close()
        node.stop()
