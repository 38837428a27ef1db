"""A stored spec the node cannot read (written by another version, or before a bound was added:
a stream trigger's claim_idle_s of 1e300) is skipped, as before, but no longer silently: the
node's log names the function and the field, once, while the readable functions are served."""

from __future__ import annotations

import json
import time

import redis
from hearth_proc import start_hearth, stop_hearth

H = "hearth.functions.examples.handlers"


def test_a_stored_spec_the_node_cannot_read_is_named_once_in_its_log(redis_server, tmp_path):
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    old = {
        "name": "old",
        "handler": f"{H}:echo",
        "triggers": [{"type": "redis-stream", "stream": "s", "claim_idle_s": 1e300}],
    }
    r.hset("hearth:functions", mapping={"old": json.dumps(old)})
    r.hset("hearth:functions", "good", json.dumps({"name": "good", "handler": f"{H}:echo"}))
    h = start_hearth(tmp_path, redis_server.url, "unix")
    try:
        assert h.client.invoke("good", b"{}", "application/json").json() == {}
        time.sleep(3)  # several rounds of the registry sync
        log = h.node.log_path.read_text(errors="replace")
        line = "registry: function old is not served, its stored spec is invalid: "
        assert log.count(line) == 1, log[-3000:]
        assert "triggers.0.redis-stream.claim_idle_s: Input should be less than or equal" in log
        assert "old" not in h.client.status()["functions"]
    finally:
        stop_hearth(h)
        r.flushall()
