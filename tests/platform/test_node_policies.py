"""What a real `hearth up` node does with idle instances: evicts them under memory pressure (in
the keep-alive policy's order, never a busy one), releases them early under the
cold-start-aware policy, and unloads then pre-warms them under the hybrid-histogram policy.
Checked on the node's own state (instance table, pids, the X-Hearth-Cold header), with waits
many times longer than the behaviour needs: no wall-time asserts."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hearth.client import ClientError
from realnode import alive, live_instances, start_checked, wait_for

pytestmark = pytest.mark.slow  # real nodes and instance processes: tens of seconds
SLEEP = "hearth.functions.examples.handlers:sleep"


def _deploy(c, name: str, memory_mb: int = 64, policy: str = "fixed", ttl_s: float = 600):
    c.deploy(
        {
            "name": name,
            "handler": SLEEP,
            "resources": {"memory_mb": memory_mb, "cpu_millicores": 100},
            "max_instances": 1,
            "timeout_s": 60,
            "keep_alive": {"policy": policy, "ttl_s": ttl_s},
        }
    )


def _call(c, name: str, seconds: float = 0.0) -> tuple[int, bool]:
    """(pid, cold) of one invocation."""
    r = c.invoke(name, json.dumps({"seconds": seconds}).encode(), "application/json")
    return r.json()["pid"], r.headers["X-Hearth-Cold"] == "1"


def _inflight(c, name: str) -> int:
    return sum(i["inflight"] for i in live_instances(c, name))


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    return t, out


@pytest.fixture
def small_node(redis_server, tmp_path):
    """One node with 600 MiB for instances: room for two 256 MiB instances, not three."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    n = start_checked(
        tmp_path / "node", redis_url=redis_server.url, env={"HEARTH_NODES": "local:8000:600"}
    )
    yield n
    n.stop()


def test_eviction_under_memory_pressure(small_node):
    c = small_node.client
    for name in ("ev-a", "ev-b", "ev-c"):
        _deploy(c, name, memory_mb=256)
    pid_a, _ = _call(c, "ev-a")
    pid_b, _ = _call(c, "ev-b")
    # no room for c: the least recently used idle instance (a) is evicted, b stays
    pid_c, cold = _call(c, "ev-c")
    assert cold
    wait_for(lambda: not alive(pid_a), 30, "the evicted instance to exit")
    assert live_instances(c, "ev-a") == []
    assert [i["pid"] for i in live_instances(c, "ev-b")] == [pid_b]
    # c busy: a busy instance is never evicted, so a's return evicts the idle b
    t, out = _in_thread(_call, c, "ev-c", 4.0)
    wait_for(lambda: _inflight(c, "ev-c") == 1, 30, "c to be busy")
    pid_a2, cold = _call(c, "ev-a")
    assert cold and pid_a2 != pid_a
    wait_for(lambda: not alive(pid_b), 30, "b to be evicted")
    t.join()
    assert out == [(pid_c, False)]  # c finished its work on the same process
    # a and c both busy: nothing may be evicted, so b is refused with a clear 429
    ts = [_in_thread(_call, c, n, 4.0) for n in ("ev-a", "ev-c")]
    wait_for(lambda: _inflight(c, "ev-a") == 1 and _inflight(c, "ev-c") == 1, 30, "a and c busy")
    with pytest.raises(ClientError) as e:
        _call(c, "ev-b")
    assert e.value.status == 429 and json.loads(e.value.body)["error"] == "no_capacity"
    for t, out in ts:
        t.join()
        assert out and out[0][1] is False
    assert {i["pid"] for i in live_instances(c, "ev-a")} == {pid_a2}


@pytest.fixture(scope="module")
def tuned_node(redis_server, tmp_path_factory):
    """The histogram policy in 1 s bins over a minute (the paper's are 1 min over 4 h), so its
    pre-warm shows within seconds; the cold-start-aware policy with its defaults."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    n = start_checked(
        tmp_path_factory.mktemp("tuned"),
        redis_url=redis_server.url,
        env={"HEARTH_KEEPALIVE_TUNING": "histogram:bin_s=1,range_s=60,min_samples=3"},
    )
    yield n
    n.stop()


def test_coldstart_aware_releases_what_fixed_keeps(tuned_node):
    """Arrivals 1 s apart: the cold-start-aware policy keeps an idle instance about as long as
    the longest idle time it saw (plus a margin), not the 600 s TTL the fixed policy keeps."""
    c = tuned_node.client
    _deploy(c, "csa", policy="coldstart-aware")
    _deploy(c, "fixed-ref", policy="fixed")
    pids = {}
    for _ in range(5):  # the first arrival has no idle time before it: 4 samples of ~1 s
        pids["csa"], _ = _call(c, "csa")
        pids["fixed-ref"], _ = _call(c, "fixed-ref")
        time.sleep(1.0)
    wait_for(lambda: not alive(pids["csa"]), 60, "the cold-start-aware instance to be released")
    assert live_instances(c, "csa") == []
    assert [i["pid"] for i in live_instances(c, "fixed-ref")] == [pids["fixed-ref"]]
    _, cold = _call(c, "csa")
    assert cold  # released, so the next call starts one


def test_histogram_unloads_then_prewarms_before_the_next_arrival(tuned_node):
    """A function called every 3 s: once the histogram has 3 idle times, an instance is
    unloaded as soon as it goes idle and a new one is started (pre-warmed) shortly before the
    next predicted arrival, which then finds it warm."""
    c = tuned_node.client
    _deploy(c, "hist", policy="histogram")
    for _ in range(3):  # 2 idle samples: too few for the histogram, the instance is kept
        pid, _ = _call(c, "hist")
        time.sleep(3.0)
    assert [i["pid"] for i in live_instances(c, "hist")] == [pid]
    starts_before = len(_cold_starts(c, "hist"))
    pid4, cold = _call(c, "hist")  # the 3rd idle sample: from now on unload + pre-warm
    assert pid4 == pid and not cold
    wait_for(lambda: not alive(pid4), 30, "the instance to be unloaded right after its call")
    live = wait_for(
        lambda: [i for i in live_instances(c, "hist") if i["state"] == "idle"],
        30,
        "a pre-warmed instance",
    )
    (prewarmed,) = live
    assert prewarmed["pid"] != pid4 and prewarmed["served"] == 0
    assert len(_cold_starts(c, "hist")) == starts_before + 1  # started with no request waiting
    pid5, cold = _call(c, "hist")
    assert pid5 == prewarmed["pid"] and not cold  # the arrival found it warm


def _cold_starts(c, name: str) -> list[dict]:
    recs = c.request("GET", "/v1/coldstarts", admin=True).json()["coldstarts"]
    return [r for r in recs if r["function"] == name]
