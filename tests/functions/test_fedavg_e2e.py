"""End to end on the real platform: `hearth up` (gateway, node agent, proxy, instance processes,
shared-memory slots), the planner's specs deployed through the admin API, two rounds driven over
HTTP with the fedavg client; the result equals Flower's aggregate() and no instance starts after
round 1 (warm reuse)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate
from hearth.client import Client
from hearth.functions.fedavg import client as fl
from hearth.functions.fedavg.aggregation import parse_model
from hearth.functions.fedavg.tree import plan_tree
from realnode import start_checked

TOKEN = "fedavg-admin-token-0123456789"


@pytest.fixture(scope="module")
def platform(redis_server, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("hearth-fedavg")
    node = start_checked(
        tmp,
        redis_url=redis_server.url,
        token=TOKEN,
        env={"HEARTH_MAX_BODY_BYTES": str(64 * 1024 * 1024)},
    )
    yield node.client, tmp
    node.stop()


def instance_ids(c: Client, names: list[str]) -> dict[str, list[str]]:
    fns = c.status()["functions"]
    return {
        n: sorted(
            f"{i['id']}/{i['pid']}"
            for i in (fns.get(n) or {}).get("instances", [])
            if i["state"] not in ("stopping", "dead")
        )
        for n in names
    }


def test_two_rounds_on_the_platform_equal_flower_and_stay_warm(platform):
    c, tmp = platform
    plan = plan_tree({"node-0": 4}, fan_in=2, levels=2)
    specs = plan.function_specs(model_bytes=1 << 20)
    for s in specs:
        c.deploy(s.to_dict())
    names = [s.name for s in specs]
    url = c.url
    rng = np.random.default_rng(0)
    seen = None
    for rnd in (1, 2):
        fl.open_round(url, plan, rnd)
        ups = []
        for i in range(4):
            m = [
                ("conv.weight", rng.uniform(1, 2, (16, 3, 3, 3)).astype(np.float32)),
                ("fc.bias", rng.uniform(1, 2, 10).astype(np.float32)),
            ]
            n = int(rng.integers(1, 500))
            ups.append((m, n))
            r = fl.submit(url, plan.leaf_for("node-0", i).instance, m, n, rnd, f"c{i}")
            assert r.status == 200, r.body
        model = parse_model(fl.fetch(url, plan, rnd).body)
        ref = aggregate([([a for _, a in m], n) for m, n in ups])
        assert [nm for nm, _ in model.layers] == ["conv.weight", "fc.bias"]
        for (_, got), want in zip(model.layers, ref, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5)
        ids = instance_ids(c, names)
        assert all(ids.values()), ids
        if seen is None:
            seen = ids
        else:
            assert ids == seen  # round 2 ran on the same processes: no start after round 1
    st = fl.status(url, plan)
    assert st[plan.top.name]["models"] == [1, 2]
    assert st[plan.top.name]["accumulators_created"] == 1
    with pytest.raises(fl.GatewayError, match="HTTP 409"):
        fl.submit(url, plan.leaf_for("node-0", 0).instance, ups[0][0], 3, 2, "late")


def test_updates_submitted_through_a_redis_stream(platform, redis_server):
    """Clients publish packed updates to the leaves' streams (the queue trigger invokes the
    leaf); the same event delivered twice is folded once."""
    import redis
    from hearth.functions.fedavg.pack import pack
    from hearth.queue.producer import publish_sync

    c, _ = platform
    plan = plan_tree({"node-0": 3}, fan_in=3, levels=2, prefix="flstream")
    for s in plan.function_specs(model_bytes=1 << 16, stream_prefix="fl:"):
        c.deploy(s.to_dict())
    url = c.url
    r = redis.Redis.from_url(redis_server.url)
    rng = np.random.default_rng(1)
    ups = [
        ([("w", rng.uniform(1, 2, (32, 8)).astype(np.float32))], int(rng.integers(1, 50)))
        for _ in range(3)
    ]
    fl.open_round(url, plan, 1)
    leaf = plan.by_level("leaf")[0].name
    for i, (m, n) in enumerate(ups):
        body = bytes(pack(m, n, round=1, client=f"s{i}"))
        publish_sync(r, f"fl:{leaf}", body, "application/octet-stream")
        if i == 0:
            publish_sync(r, f"fl:{leaf}", body, "application/octet-stream")  # a redelivery
    deadline = time.monotonic() + 60
    reply = None
    while time.monotonic() < deadline:
        try:
            reply = fl.fetch(url, plan, 1)
            break
        except fl.GatewayError:
            time.sleep(0.2)
    assert reply is not None, "the stream updates were not aggregated in time"
    model = parse_model(reply.body)
    ref = aggregate([([a for _, a in m], n) for m, n in ups])
    np.testing.assert_allclose(model.layers[0][1], ref[0], rtol=1e-5)
    assert model.n == sum(n for _, n in ups)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and fl.status(url, plan)[leaf]["duplicates"] < 1:
        time.sleep(0.2)
    assert fl.status(url, plan)[leaf]["duplicates"] == 1
