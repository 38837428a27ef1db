"""The node agent's registry sync and its own admin API act on one registry. A sync step awaits
for seconds (draining an instance, a cold start); an admin change made meanwhile must not be
undone by the rest of the step: a deleted function deployed again from a stale read (it was,
for a second, with its triggers), or its stream triggers started after the delete stopped them.
Real `hearth up`, real Redis, real instance processes."""

from __future__ import annotations

import json
import threading
import time

import redis
from hearth.localnode import start_node
from hearth.queue.keys import TRIGGERS_KEY
from hearth.registry import KEY
from realnode import wait_for

SLEEP = "hearth.functions.examples.handlers:sleep"
DRAIN_S = 6  # the busy instance's invocation: the delete is sent well within it


def test_an_admin_delete_during_a_slow_sync_stays_deleted(tmp_path, redis_url):
    node = start_node(tmp_path / "state", redis_url=redis_url, dataplane="unix")
    r = redis.Redis.from_url(redis_url)
    try:
        c = node.client
        c.deploy({"name": "slow", "handler": SLEEP, "timeout_s": 60})
        c.deploy({"name": "victim", "handler": "hearth.functions.examples.handlers:hello"})
        names = lambda: {f["name"] for f in c.functions()}  # noqa: E731
        wait_for(lambda: names() >= {"slow", "victim"}, 60, "both deployed")
        time.sleep(1.5)  # a sync round has seen both: they are the registry's now
        # a long invocation keeps `slow`'s instance busy
        t = threading.Thread(
            target=c.invoke,
            args=("slow", json.dumps({"seconds": DRAIN_S}).encode(), "application/json"),
            daemon=True,
        )
        t.start()
        wait_for(
            lambda: (c.status()["functions"]["slow"]["instances"] or [{}])[0].get("inflight") == 1,
            60,
            "busy",
        )
        # `slow` leaves the registry behind this agent's back (another node's admin API): the
        # next sync undeploys it here, draining the busy instance for seconds, with its read of
        # the registry -- which still lists `victim` -- in hand
        r.hdel(KEY, "slow")
        wait_for(lambda: "slow" not in names(), 60, "the sync undeploying slow")
        # the race is on only while the drain lasts: the invocation has not returned yet
        assert t.is_alive(), "the drain ended before the delete: the race was not exercised"
        c.delete("victim")  # waits for the sync's step (the drain) to end
        assert r.hget(KEY, "victim") is None
        # it must stay gone: watch for several sync rounds
        seen = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            seen |= names()
            time.sleep(0.05)
        assert "victim" not in seen, "a stale registry read deployed the deleted function again"
        t.join(30)
    finally:
        r.close()
        node.stop()


SLOW_START = """import time

time.sleep({s})  # a slow import: the cold start the sync's deploy step waits for


def handle(event):
    return {{}}
"""


def test_an_admin_delete_during_a_syncs_cold_start_leaves_no_trigger(tmp_path, redis_url):
    """The sync deploys a function from the registry (its cold start takes seconds), then starts
    its stream triggers; an admin delete during the cold start must not be followed by them."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "slowstart.py").write_text(SLOW_START.format(s=3))
    node = start_node(tmp_path / "state", redis_url=redis_url, dataplane="unix")
    r = redis.Redis.from_url(redis_url)

    def registered() -> list[str]:  # the triggers a runner registered for `late`
        return [
            v.decode()
            for v in r.hvals(TRIGGERS_KEY)
            if json.loads(v)["function"] == "late" and json.loads(v)["stream"] == "late-in"
        ]

    try:
        c = node.client
        spec = {
            "name": "late",
            "handler": "slowstart:handle",
            "code_path": str(code),
            "min_instances": 1,
            "triggers": [{"type": "redis-stream", "stream": "late-in"}],
        }
        # deployed through another node's admin API: this node's sync deploys it
        r.hset(KEY, "late", json.dumps(spec))
        wait_for(lambda: any(f["name"] == "late" for f in c.functions()), 60, "the sync deploying")
        st = c.status()["functions"]["late"]
        assert not any(i["state"] == "ready" for i in st["instances"]), "cold start already over"
        c.delete("late")
        assert r.hget(KEY, "late") is None
        # without the lock the step goes on once the import is done (3 s): watch past that
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            assert registered() == [], "the deleted function's stream trigger was started"
            time.sleep(0.1)
        assert "late" not in {f["name"] for f in c.functions()}
    finally:
        r.close()
        node.stop()
