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


async def test_a_value_replaced_and_stored_again_is_named_again(redis_server, caplog):
    """The names already reported are only those still stored: a spec fixed (or removed) and
    then stored invalid again is reported again, and the registry keeps nothing of it after."""
    import redis.asyncio as aioredis
    from hearth.registry import KEY, Registry

    r = aioredis.Redis.from_url(redis_server.url)
    await r.delete(KEY)
    bad = json.dumps({"name": "bad", "handler": f"{H}:echo", "timeout_s": 1e9})
    good = json.dumps({"name": "bad", "handler": f"{H}:echo"})
    reg = Registry(r)
    caplog.set_level("WARNING", logger="hearth.registry")
    try:
        for value, served in ((bad, 0), (bad, 0), (good, 1), (bad, 0)):
            await r.hset(KEY, "bad", value)
            assert len(await reg.all()) == served
        warned = [m for m in caplog.messages if "function bad is not served" in m]
        assert len(warned) == 2, warned  # the first and the fourth read, not the second
        await r.delete(KEY)
        assert await reg.all() == [] and not reg._unreadable
    finally:
        await r.delete(KEY)
        await r.aclose()
