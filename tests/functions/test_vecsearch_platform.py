"""vecsearch on the real platform: `hearth up` (gateway, node agent, proxy daemon, instance
processes, shared-memory slots), one function per partition holder as in
functions/vecsearch/specs/vecsearch-holders.yaml, queries over HTTP. The root holder fans out
to the others with `context.invoke` over the data plane; the ids equal the in-process search
and exact queries have recall 1 against brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hearth.functions.vecsearch import data, query, storage
from realnode import live_instances, metric, start_checked
from vecindex import index_file

pytestmark = pytest.mark.slow  # real nodes and instance processes: tens of seconds
K = 10
FLT = {"and": [{"attr": "rank", "lt": 4000}, {"attr": "len", "in": [4, 5, 6]}]}
HANDLER = "hearth.functions.vecsearch.handlers:handle"


@pytest.fixture(scope="module")
def split():
    return data.glove_split(6000, 24, seed=5)


@pytest.fixture(scope="module")
def index_path(split, tmp_path_factory):
    return index_file(split, tmp_path_factory.mktemp("vecp"))


@pytest.fixture(scope="module")
def node(redis_server, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    n = start_checked(
        tmp_path_factory.mktemp("hearth-vec"),
        redis_url=redis_server.url,
        env={"HEARTH_MAX_BODY_BYTES": str(8 * 1024 * 1024)},
    )
    yield n
    n.stop()


def _deploy_holders(c, prefix: str, holders: int, index_path) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(holders)]
    for name in names:
        c.deploy(
            {
                "name": name,
                "handler": HANDLER,
                "env": {
                    "HEARTH_VEC_INDEX": str(index_path),
                    "HEARTH_VEC_HOLDERS": str(holders),
                    "HEARTH_VEC_BRANCHING": "2",
                    "HEARTH_VEC_CHILD": prefix + "-{node}",
                },
                "resources": {"memory_mb": 256, "cpu_millicores": 100},
                "concurrency": 4,
                "timeout_s": 120,
                "max_instances": 1,
                "keep_alive": {"policy": "fixed", "ttl_s": 600},
            }
        )
    return names


def _query(c, entry: str, body: dict) -> dict:
    r = c.invoke(entry, json.dumps(body).encode(), "application/json")
    assert r.status == 200, r.body[:500]
    return json.loads(r.body)


def _mask(split):
    a = split.attrs
    return (a["rank"] < 4000) & np.isin(a["len"], [4, 5, 6])


@pytest.mark.parametrize("holders", [2, 4])
def test_holders_fan_out_over_the_data_plane(node, split, index_path, holders):
    c = node.client
    prefix = f"vs{holders}"
    names = _deploy_holders(c, prefix, holders, index_path)
    try:
        delivered = {n: metric(c, "hearth_dataplane_messages_total", function=n) for n in names}
        idx = storage.load(index_path)
        for flt in (None, FLT):
            body = {"vectors": split.queries.tolist(), "k": K, "filter": flt}
            out = _query(c, names[0], body)
            # every holder took part, each in its own process, reached over the data plane
            assert out["stats"]["holders_reached"] == holders
            assert out["stats"]["holders"] == holders
            got = np.array([r["ids"] for r in out["results"]])
            want = query.search(idx, split.queries, K, flt=flt)
            assert (got == want.ids).all(), "ids differ from the in-process search"
            assert all(len(r["labels"]) == K for r in out["results"])
            exact = _query(c, names[0], body | {"exact": True})
            truth, _ = data.brute_force(
                split.base, split.queries, K, mask=None if flt is None else _mask(split)
            )
            found = np.array([r["ids"] for r in exact["results"]])
            assert data.recall(found, split.base_ids[truth]) == 1.0
        pids = {n: [i["pid"] for i in live_instances(c, n)] for n in names}
        assert all(len(p) == 1 for p in pids.values()), pids
        assert len({p[0] for p in pids.values()}) == holders  # one process per holder
        # each child holder received its tree hops as descriptors through the proxy: 4 queries
        # (approximate and exact, with and without the filter) -> at least 4 each
        for n in names[1:]:
            got_msgs = metric(c, "hearth_dataplane_messages_total", function=n) - delivered[n]
            assert got_msgs >= 4, f"{n} got {got_msgs} descriptors"
        served = {
            i["id"]: i["served"] for n in names[1:] for i in live_instances(c, n)
        }  # chained calls count on the instance
        assert all(v >= 4 for v in served.values()), served
    finally:
        for n in names:
            c.delete(n)
