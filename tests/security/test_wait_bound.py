"""The node's wait bound (HEARTH_MAX_QUEUE_WAIT_S) under overload: `hearth up` applies it
(it did not: the setting was read and dropped)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hearth.client import ClientError
from hearth.localnode import LocalNode

#: the module's node (conftest `size_node`): calls may wait 0.5 s for an instance, no longer
NODE_ENV = {"HEARTH_MAX_QUEUE_WAIT_S": "0.5"}


def test_hearth_up_bounds_the_wait_for_an_instance(size_node: LocalNode):
    """Through a real `hearth up` with HEARTH_MAX_QUEUE_WAIT_S=0.5: with the only instance
    busy for 3 s, the next call is answered 429 + Retry-After instead of waiting its turn
    (before the fix `hearth up` ignored the setting and that call waited, then got 200);
    the call that holds the instance is still answered 200."""
    c = size_node.client
    c.deploy(
        {
            "name": "nap",
            "handler": "hearth.functions.replay.workload:handle",
            "concurrency": 1,
            "max_instances": 1,
            "queue_size": 100,
        }
    )
    nap = json.dumps({"duration_ms": 3000, "memory_mb": 0, "mode": "sleep"}).encode()
    assert c.invoke("nap", b'{"duration_ms": 0, "memory_mb": 0}', "application/json").status == 200
    with ThreadPoolExecutor(1) as ex:
        first = ex.submit(c.invoke, "nap", nap, "application/json")
        for _ in range(200):  # until the call holds the instance
            inst = c.status()["functions"]["nap"]["instances"]
            if any(i["inflight"] for i in inst) or first.done():
                break
            time.sleep(0.02)
        with pytest.raises(ClientError) as e:
            c.invoke("nap", nap, "application/json")
        assert e.value.status == 429, e.value
        assert json.loads(e.value.body)["error"] == "overloaded"
        assert first.result(timeout=60).status == 200  # the admitted call: answered
