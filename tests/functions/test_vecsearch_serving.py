"""vecsearch serving: hearth.sdk handler, tree fan-out over holders, warm retention, HTTP-style
errors, updates through the tree, and the `hearth vec` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from hearth.functions.vecsearch import data, handlers, query, storage
from hearth.functions.vecsearch.tree import LocalTree
from hearth.sdk import JSON, MSGPACK, Context, Event, HandlerError
from vecindex import index_file

K = 10
FLT = {"and": [{"attr": "rank", "lt": 4000}, {"attr": "len", "in": [4, 5, 6]}]}


@pytest.fixture(scope="module")
def split():
    return data.glove_split(6000, 40, seed=3)


@pytest.fixture(scope="module")
def index_path(split, tmp_path_factory):
    return index_file(split, tmp_path_factory.mktemp("vec"))


def _body(split, **kw):
    return {"vectors": split.queries.tolist(), "k": K} | kw


@pytest.mark.parametrize("holders", [1, 2, 4])
@pytest.mark.parametrize("flt", [None, FLT])
def test_tree_matches_in_process(split, index_path, holders, flt):
    idx = storage.load(index_path)
    want = query.search(idx, split.queries, K, flt=flt)
    tree = LocalTree(str(index_path), holders=holders, branching=2)
    out = tree.request(_body(split, filter=flt))
    got = np.array([r["ids"] for r in out["results"]])
    assert (got == want.ids).all()
    assert out["stats"]["holders_reached"] == holders
    assert tree.hops == holders - 1
    assert all(len(r["labels"]) == K for r in out["results"])
    ex = tree.request(_body(split, filter=flt, exact=True))
    truth, _ = data.brute_force(
        split.base, split.queries, K, mask=None if flt is None else _mask(split, flt)
    )
    assert data.recall(np.array([r["ids"] for r in ex["results"]]), split.base_ids[truth]) == 1.0


def _mask(split, flt):
    a = split.attrs
    return (a["rank"] < 4000) & np.isin(a["len"], [4, 5, 6])


def test_warm_state_is_reused(split, index_path, monkeypatch):
    monkeypatch.setenv("HEARTH_VEC_INDEX", str(index_path))
    monkeypatch.setenv("HEARTH_VEC_HOLDERS", "1")
    monkeypatch.setattr(handlers, "_STATE", None)
    ctx = Context(
        function="vecsearch", instance_id="i0", invocation_id="a", deadline=time.time() + 30
    )
    body = json.dumps(_body(split)).encode()
    first = handlers.handle(Event(memoryview(body), ctx, JSON))
    second = handlers.handle(Event(memoryview(msgpack.packb(_body(split))), ctx, MSGPACK))
    assert first["stats"]["cold"] is True and second["stats"]["cold"] is False
    assert first["results"] == second["results"]
    assert handlers._STATE.invocations == 2


def _tree(**kw):
    return {"node": 0, "holders": 1, "b": 1, "child": "vecsearch-{node}"} | kw


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"vectors": [[0.0] * 7]}, "wrong dimension 7"),
        (
            {"vectors": [[0.0] * 50], "filter": {"attr": "colour", "eq": 1}},
            "unknown attribute 'colour'",
        ),
        (
            {"vectors": [[0.0] * 50], "filter": {"or": [{"attr": "rank", "below": 1}]}},
            "filter.or[0]: unknown operator 'below'",
        ),
        ({"vectors": [[0.0] * 50], "k": "ten"}, "k: expected an integer"),
        ({"k": 3}, "vectors: required"),
        ({"op": "drop"}, "unknown operation 'drop'"),
        ({"vectors": [[0.0] * 50], "params": {"speed": 3}}, "params: unknown field"),
        ([1, 2], "body: expected an object"),
        # search params: types and ranges are checked, not handed to numpy/numba
        ({"vectors": [[0.0] * 50], "params": {"ratio": "x"}}, "params.ratio: expected a number"),
        ({"vectors": [[0.0] * 50], "params": {"ratio": -1}}, "params.ratio: must be > 0"),
        ({"vectors": [[0.0] * 50], "params": {"keep_frac": 0}}, "params.keep_frac: must be > 0"),
        ({"vectors": [[0.0] * 50], "params": {"keep_frac": 2}}, "params.keep_frac: must be <= 1"),
        (
            {"vectors": [[0.0] * 50], "params": {"rerank": 2.5}},
            "params.rerank: expected an integer",
        ),
        ({"vectors": [[0.0] * 50], "params": {"max_visit": -1}}, "params.max_visit: must be >= 0"),
        ({"vectors": [[0.0] * 50], "params": {"threads": True}}, "params.threads: expected an"),
        (
            {"vectors": [[0.0] * 50], "params": {"filter_coverage": float("nan")}},
            "params.filter_coverage: expected a finite number",
        ),
        # the internal hop fields arrive in the body too: an HTTP caller can send them
        ({"vectors": [[0.0] * 50], "_tree": {}}, "_tree: missing field(s)"),
        ({"vectors": [[0.0] * 50], "_tree": [1]}, "_tree: expected an object"),
        ({"vectors": [[0.0] * 50], "_tree": _tree(node="a")}, "_tree.node: expected an integer"),
        ({"vectors": [[0.0] * 50], "_tree": _tree(node=5)}, "_tree.node: must be < _tree.holders"),
        ({"vectors": [[0.0] * 50], "_tree": _tree(holders=0)}, "_tree.holders: must be >= 1"),
        ({"vectors": [[0.0] * 50], "_tree": _tree(b=None)}, "_tree.b: expected an integer"),
        ({"vectors": [[0.0] * 50], "_tree": _tree(child=7)}, "_tree.child: expected"),
        ({"vectors": [[0.0] * 50], "_tree": _tree(child="v-{x}")}, "_tree.child: bad name"),
        (
            {"vectors": [[0.0] * 50], "_tree": _tree(), "order": b"\0" * 8, "nvisit": [1]},
            "order_shape: expected",
        ),
        (
            {"vectors": [[0.0] * 50], "_tree": _tree(), "order": b"\0" * 8, "order_shape": [1, 3]},
            "order_shape: [1, 3] does not match",
        ),
        (
            {"vectors": [[0.0] * 50], "_tree": _tree(), "order": [[0, 99999]], "nvisit": [1]},
            "order: list ids must be in",
        ),
        (
            {"vectors": [[0.0] * 50], "_tree": _tree(), "order": [[0, 1]], "nvisit": [3]},
            "nvisit: values must be in [0, 2]",
        ),
        ({"vectors": b"\0" * 200, "shape": "x"}, "shape: expected a list of integers"),
    ],
)
def test_bad_requests_are_400(index_path, body, needle):
    tree = LocalTree(str(index_path), holders=2)
    with pytest.raises(HandlerError) as e:
        tree.request(body)
    assert e.value.status == 400 and needle in str(e.value)


def test_valid_tree_and_params_still_served(split, index_path):
    tree = LocalTree(str(index_path), holders=2)
    prm = {"ratio": 2, "keep_frac": 1, "rerank": 30.0, "threads": 1}
    root = tree.request(_body(split, params=prm))
    assert all(len(r["ids"]) == K for r in root["results"])
    # a well-formed hop (what a parent holder sends) is still accepted
    hop = tree.request({"vectors": split.queries[:2].tolist(), "k": K, "_tree": _tree(holders=2)})
    assert len(np.frombuffer(hop["ids"], np.int64)) == 2 * K


def test_tree_field_over_http_is_400(index_path, monkeypatch):
    monkeypatch.setenv("HEARTH_VEC_INDEX", str(index_path))
    monkeypatch.setattr(handlers, "_STATE", None)
    ctx = Context(
        function="vecsearch", instance_id="i0", invocation_id="a", deadline=time.time() + 30
    )
    body = json.dumps({"vectors": [[0.0] * 50], "_tree": {}}).encode()
    with pytest.raises(HandlerError) as e:
        handlers.handle(Event(memoryview(body), ctx, JSON))
    assert e.value.status == 400 and "_tree" in str(e.value)


def test_handle_without_index_env_is_500(monkeypatch):
    monkeypatch.delenv("HEARTH_VEC_INDEX", raising=False)
    monkeypatch.setattr(handlers, "_STATE", None)
    ctx = Context(
        function="vecsearch", instance_id="i0", invocation_id="a", deadline=time.time() + 30
    )
    with pytest.raises(HandlerError) as e:
        handlers.handle(Event(memoryview(b"{}"), ctx, JSON))
    assert e.value.status == 500 and "HEARTH_VEC_INDEX" in str(e.value)


def test_updates_reach_every_holder(split, index_path):
    tree = LocalTree(str(index_path), holders=4, branching=2)
    q = split.queries[:3]
    ins = tree.request(
        {
            "op": "insert",
            "vectors": q.tolist(),
            "attrs": {"rank": [1, 2, 3], "len": [3, 3, 3], "u": [0, 0, 0]},
            "ids": [900001, 900002, 900003],
        }
    )
    assert ins["inserted"] == 3
    assert all(st is not None and st.index.n_live == 6003 for st in tree.states)
    out = tree.request({"vectors": q.tolist(), "k": K})
    assert [r["ids"][0] for r in out["results"]] == [900001, 900002, 900003]
    dele = tree.request({"op": "delete", "ids": [900002]})
    assert dele["deleted"] == 1
    out = tree.request({"vectors": q.tolist(), "k": K, "filter": {"attr": "len", "eq": 3}})
    assert 900002 not in sum((r["ids"] for r in out["results"]), [])
    with pytest.raises(HandlerError) as e:
        tree.request({"op": "insert", "vectors": q[:1].tolist(), "attrs": {"rank": [1]}})
    assert e.value.status == 400 and "missing attribute" in str(e.value)


def _cli(*args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "hearth.cli", "vec", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_cli_build_query_info(tmp_path, split):
    out = tmp_path / "cli.hvx"
    _cli("build", "--glove", "--n", "3000", "--partitions", "2", "-o", str(out), "--no-progress")
    info = json.loads(_cli("info", str(out), "--json").stdout)
    assert (
        info["rows"] == 3000
        and info["dims"] == 50
        and [a["name"] for a in info["attributes"]] == ["rank", "len", "u"]
    )
    vec = json.dumps(split.queries[0].tolist())
    res = json.loads(
        _cli(
            "query",
            str(out),
            "--vector",
            vec,
            "-k",
            "5",
            "--filter",
            '{"attr": "len", "lt": 6}',
            "--json",
        ).stdout
    )
    assert len(res["results"][0]["ids"]) == 5
    np.save(tmp_path / "q.npy", split.queries[:4])
    res = json.loads(
        _cli("query", str(out), "--queries", str(tmp_path / "q.npy"), "--exact", "--json").stdout
    )
    assert len(res["results"]) == 4
    # npy + csv attributes
    np.save(tmp_path / "v.npy", split.base[:500])
    (tmp_path / "a.csv").write_text(
        "price,colour\n" + "\n".join(f"{i % 50},{'red' if i % 3 else 'blue'}" for i in range(500))
    )
    out2 = tmp_path / "own.hvx"
    _cli(
        "build",
        "--npy",
        str(tmp_path / "v.npy"),
        "--attrs",
        str(tmp_path / "a.csv"),
        "-o",
        str(out2),
        "--no-progress",
    )
    res = json.loads(
        _cli(
            "query",
            str(out2),
            "--vector",
            vec,
            "--filter",
            '{"attr": "colour", "eq": "blue"}',
            "--json",
        ).stdout
    )
    assert all(i % 3 == 0 for i in res["results"][0]["ids"])
    # errors: one line, non-zero exit, no traceback
    for args, needle in [
        (("query", str(out), "--vector", "[1, 2]"), "wrong dimension 2"),
        (
            ("query", str(out), "--vector", vec, "--filter", '{"attr": "x", "lt": 1}'),
            "unknown attribute 'x'",
        ),
        (("query", str(out), "--vector", vec, "--filter", "{not json"), "--filter"),
        (("info", str(tmp_path / "a.csv")), "bad magic"),
        (("build", "-o", str(tmp_path / "x.hvx")), "--glove or --npy"),
    ]:
        r = _cli(*args, check=False)
        assert r.returncode != 0 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_example_specs_validate_and_serve(index_path, monkeypatch):
    """Each shipped spec's handler, resolved as the runtime does, answers a request on an index
    (the spec's own env, with the index path pointed at a test index)."""
    import importlib
    from pathlib import Path

    from hearth.spec import load_spec

    spec_dir = Path(handlers.__file__).parent / "specs"
    files = sorted(spec_dir.glob("*.yaml"))
    assert len(files) == 2
    for f in files:
        spec = load_spec(f)
        assert "HEARTH_VEC_INDEX" in spec.env and int(spec.env["HEARTH_VEC_HOLDERS"]) >= 1
        mod, fn = spec.handler.split(":")
        handle = getattr(importlib.import_module(mod), fn)
        for k, v in spec.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("HEARTH_VEC_INDEX", str(index_path))
        monkeypatch.setattr(handlers, "_STATE", None)
        ctx = Context(spec.name, "i0", "inv", deadline=time.time() + 30)
        out = handle(Event(memoryview(b'{"op": "info"}'), ctx, JSON))
        assert out["rows"] == 6000 and out["partitions"] == 4, f


def test_tree_field_from_a_chained_call_is_accepted(index_path, monkeypatch):
    """The same `_tree` hop that HTTP may not send is served when another function sent it."""
    monkeypatch.setenv("HEARTH_VEC_INDEX", str(index_path))
    monkeypatch.setattr(handlers, "_STATE", None)
    ctx = Context(
        function="vecsearch",
        instance_id="i0",
        invocation_id="a",
        deadline=time.time() + 30,
        caller="vecsearch",
    )
    body = json.dumps({"vectors": [[0.0] * 50], "_tree": {}}).encode()
    with pytest.raises(HandlerError) as e:  # accepted as a hop, then validated: {} lacks its fields
        handlers.handle(Event(memoryview(body), ctx, JSON))
    assert e.value.status == 400 and "internal field" not in str(e.value)
