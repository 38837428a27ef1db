"""fedavg core: trees vs Flower's aggregate(), zero copy on real shared memory, bad updates,
rounds (stragglers, deadline, late updates), fp16, memory bound, warm reuse."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate
from hearth.dataplane.shm import SlotPool
from hearth.functions.fedavg.aggregation import Aggregation, exact_fedavg, parse_model
from hearth.functions.fedavg.fold import Accumulator, UpdateRejected
from hearth.functions.fedavg.pack import Layout, PackError, pack, parse
from hearth.functions.fedavg.rounds import DuplicateUpdate, LateUpdate, RoundError
from hearth.functions.fedavg.tree import plan_tree


@pytest.fixture
def pool():
    p = SlotPool.create(
        f"hearth-fl-test-{uuid.uuid4().hex[:10]}", [(64 << 10, 64), (1 << 20, 48), (8 << 20, 8)]
    )
    yield p
    p.destroy()


def make_model(rng, shapes, dtype=np.float32, lo=1.0, hi=2.0):
    return [
        (f"layer{i}.weight", rng.uniform(lo, hi, s).astype(dtype)) for i, s in enumerate(shapes)
    ]


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    levels = int(rng.integers(1, 4))
    fan_in = int(rng.integers(2, 9))
    nnodes = 1 if levels == 1 else int(rng.integers(1, 4))
    counts = {f"node-{i}": int(rng.integers(1, 3 * fan_in + 2)) for i in range(nnodes)}
    plan = plan_tree(counts, fan_in=fan_in, levels=levels)
    shapes = [
        tuple(int(x) for x in rng.integers(1, 7, size=int(rng.integers(0, 4))))
        for _ in range(int(rng.integers(1, 5)))
    ]
    updates, nodes = [], []
    for node, c in counts.items():
        for _ in range(c):
            updates.append((make_model(rng, shapes), int(rng.integers(1, 1000))))
            nodes.append(node)
    order = rng.permutation(len(updates))  # arrival order is random across nodes
    return plan, [updates[i] for i in order], [nodes[i] for i in order]


@pytest.mark.parametrize("seed", range(16))
def test_random_trees_equal_flower_aggregate(seed, pool):
    plan, updates, nodes = random_case(seed)
    agg = Aggregation(plan, pool=pool)
    model = agg.run_round(1, updates, nodes=nodes)
    flower = aggregate([([a for _, a in m], n) for m, n in updates])
    exact = exact_fedavg(updates)
    assert [nm for nm, _ in model.layers] == [nm for nm, _ in updates[0][0]]
    assert len(model.layers) == len(flower)
    for (_, got), ref, (_, ex) in zip(model.layers, flower, exact, strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
        np.testing.assert_allclose(got, ex, rtol=1e-5, atol=0)
    assert model.n == sum(n for _, n in updates)
    assert agg.progress()["leaf" if plan.levels > 1 else "top"]["folded"] == len(updates)
    # the published payload round-trips into the same layers
    again = parse_model(model.payload)
    for (a, x), (b, y) in zip(again.layers, model.layers, strict=True):
        assert a == b and np.array_equal(x, y)
    agg.close()


def test_flat_array_updates_and_mixed_signs():
    rng = np.random.default_rng(7)
    ups = [
        (rng.standard_normal(1000).astype(np.float32), int(rng.integers(1, 50))) for _ in range(9)
    ]
    m = Aggregation(plan_tree(9, fan_in=3)).run_round(1, ups)
    assert m.layers[0][0] == "w" and m.layers[0][1].shape == (1000,)
    ref = aggregate([([a], n) for a, n in ups])[0]
    np.testing.assert_allclose(m.layers[0][1], ref, rtol=1e-5, atol=1e-6)


def test_leaf_folds_the_slot_memory_and_parents_read_child_accumulators(pool):
    plan = plan_tree({"a": 4}, fan_in=2, levels=3)
    agg = Aggregation(plan, pool=pool, promote=False)
    for a in agg.aggs.values():
        a.trace = []
    agg.start_round(1)
    rng = np.random.default_rng(1)
    used_before = pool.stats()["used"]
    for i in range(4):
        item = agg.ingest(make_model(rng, [(64, 32), (10,)]), 10 + i, client=f"c{i}", node="a")
        assert pool.stats()["used"] == used_before + 1  # the update holds one slot until folded
        slot_mem = np.frombuffer(item.slot.buf, dtype=np.uint8)
        leaf = agg._leaf_for("a")
        before = len(leaf.trace)
        agg.submit(item)
        read = leaf.trace[before:]
        assert read, "the leaf folded nothing"
        # what the fold read IS the slot the update landed in (no copy in between)
        assert all(np.shares_memory(r, slot_mem) for r in read)
        assert item.slot is None  # released right after the fold
    # partials travel as views of the child's accumulator buffer
    for r in plan.by_level("middle") + [plan.top]:
        parent = agg.aggs[r.name]
        kids = [agg.aggs[c.name] for c in plan.children(r.name)]
        assert len(parent.trace) == len(kids)
        for src in parent.trace:
            assert any(
                np.shares_memory(src, np.frombuffer(buf, np.uint8))
                for k in kids
                for buf in k.acc.buffers
            )
    assert agg.model(1).n == sum(10 + i for i in range(4))
    # every update slot went back to the pool (accumulators and the model are private memory
    # unless acc_in_pool): the pool holds exactly what it held before the round
    assert pool.stats()["used"] == used_before
    agg.close()


def test_promotion_reuses_the_leaf_accumulator_without_moving_data():
    plan = plan_tree({"a": 8}, fan_in=2, levels=3)
    agg = Aggregation(plan, promote=True)
    rng = np.random.default_rng(2)
    ups = [(make_model(rng, [(20,)]), i + 1) for i in range(8)]
    m = agg.run_round(1, ups, nodes=["a"] * 8)
    # every middle is carried by its first finished leaf, the top by its first finished middle
    assert len(agg.promotions) == len(plan.by_level("middle")) + 1
    for child, parent in agg.promotions:
        assert plan.role(child).parent == parent
    np.testing.assert_allclose(m.layers[0][1], exact_fedavg(ups)[0][1], rtol=1e-5)
    promoted = plan
    leaf_promotions = [(c, p) for c, p in agg.promotions if plan.role(c).level == "leaf"]
    for leaf, _ in leaf_promotions:
        promoted = promoted.promote(leaf)
    assert len(promoted.instances) == len(plan.instances) - len(leaf_promotions)
    # across nodes nothing is promoted: the partial travels
    plan2 = plan_tree({"a": 2, "b": 2}, fan_in=2, levels=3)
    agg2 = Aggregation(plan2, promote=True)
    agg2.run_round(1, ups[:4], nodes=["a", "a", "b", "b"])
    assert all(plan2.role(c).node == plan2.role(p).node for c, p in agg2.promotions)


def test_fp16_updates_upcast_and_keep_their_dtype():
    rng = np.random.default_rng(3)
    ups = [
        (make_model(rng, [(50, 4), (7,)], dtype=np.float16), int(rng.integers(10000, 30000)))
        for _ in range(10)
    ]
    m = Aggregation(plan_tree(10, fan_in=4)).run_round(1, ups)
    flower = aggregate([([a for _, a in u], n) for u, n in ups])
    for (_, got), ref, (_, ex) in zip(m.layers, flower, exact_fedavg(ups), strict=True):
        assert got.dtype == np.float16 == ref.dtype and got.shape == ref.shape
        # Flower multiplies in fp16 (n·w overflows fp16 above 65504) - we accumulate in fp32
        np.testing.assert_allclose(got.astype(np.float64), ex, rtol=1e-3)
    assert not all(np.isfinite(r).all() for r in flower)  # Flower's fp16 path overflowed here


def test_mixed_fp16_and_fp32_clients_in_one_round():
    rng = np.random.default_rng(4)
    ups = [
        (make_model(rng, [(30,)], dtype=np.float16 if i % 2 else np.float32), 5 + i)
        for i in range(6)
    ]
    m = Aggregation(plan_tree(6, fan_in=3)).run_round(1, ups)
    assert m.layers[0][1].dtype == np.float32  # the first update's structure
    np.testing.assert_allclose(m.layers[0][1], exact_fedavg(ups)[0][1], rtol=1e-5)


@pytest.mark.parametrize("kernels", [True, False], ids=["numba", "numpy"])
@pytest.mark.parametrize("check", ["swap", "precheck"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_update_rejected_without_touching_the_accumulator(check, bad, kernels):
    rng = np.random.default_rng(5)
    layers = make_model(rng, [(100,), (300,)])
    lay = Layout.of(layers)
    acc = Accumulator(
        lay, check=check, chunk=64, kernels=kernels
    )  # many chunks: the bad one is late
    acc.fold(pack(layers, 3))
    acc.fold(pack(make_model(rng, [(100,), (300,)]), 4))
    before = acc.value.copy()
    poisoned = make_model(rng, [(100,), (300,)])
    poisoned[1][1][290] = bad
    with pytest.raises(UpdateRejected, match=r"non-finite.*layer1\.weight.*element 290"):
        acc.fold(pack(poisoned, 5, client="evil"))
    assert np.array_equal(acc.value, before)  # bit for bit
    assert acc.count == 2 and acc.n == 7
    good = make_model(rng, [(100,), (300,)])
    acc.fold(pack(good, 2))
    ref = before + 2 * np.concatenate([good[0][1], good[1][1]])
    np.testing.assert_allclose(acc.value, ref, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernels", [True, False], ids=["numba", "numpy"])
def test_threads_and_kernels_give_the_same_sums(threads, kernels):
    rng = np.random.default_rng(14)
    ups = [(make_model(rng, [(1000,), (37, 3)]), int(rng.integers(1, 99))) for _ in range(5)]
    ref = Accumulator(Layout.of(ups[0][0]), kernels=False, chunk=128)
    acc = Accumulator(Layout.of(ups[0][0]), kernels=kernels, threads=threads, chunk=128)
    for m, n in ups:
        ref.fold(pack(m, n))
        acc.fold(pack(m, n))
    np.testing.assert_allclose(acc.value, ref.value, rtol=1e-6)
    bad = make_model(rng, [(1000,), (37, 3)])
    bad[0][1][999] = np.nan
    before = acc.value.copy()
    with pytest.raises(UpdateRejected, match="element 999"):
        acc.fold(pack(bad, 3))
    assert np.array_equal(before, acc.value)


def test_bad_first_update_leaves_accumulator_empty():
    rng = np.random.default_rng(6)
    layers = make_model(rng, [(10,)])
    layers[0][1][9] = np.nan
    acc = Accumulator(Layout.of(layers))
    with pytest.raises(UpdateRejected):
        acc.fold(pack(layers, 1))
    assert acc.count == 0 and acc.n == 0
    good = make_model(rng, [(10,)])
    acc.fold(pack(good, 2))
    np.testing.assert_allclose(acc.value, 2 * good[0][1], rtol=1e-7)


def test_shape_mismatch_and_bad_update_are_rejected_per_update_round_survives():
    rng = np.random.default_rng(8)
    agg = Aggregation(plan_tree(4, fan_in=2))
    agg.start_round(1)
    ups = [(make_model(rng, [(5, 3), (2,)]), 10 * (i + 1)) for i in range(4)]
    agg.submit(agg.ingest(*ups[0], client="c0"))
    with pytest.raises(
        UpdateRejected, match=r"layer0\.weight.*expected shape \(5, 3\), got \(3, 5\)"
    ):
        agg.submit(agg.ingest(make_model(rng, [(3, 5), (2,)]), 7, client="c1"))
    with pytest.raises(UpdateRejected, match="expected 2 layers, got 1"):
        agg.submit(agg.ingest(make_model(rng, [(5, 3)]), 7, client="c1"))
    nan = make_model(rng, [(5, 3), (2,)])
    nan[0][1][4, 2] = np.nan
    with pytest.raises(UpdateRejected, match="non-finite"):
        agg.submit(agg.ingest(nan, 7, client="c1"))
    assert "c1" in agg.round.rejected
    for i in range(1, 4):  # c1 resubmits a good update; the round completes exactly
        agg.submit(agg.ingest(*ups[i], client=f"c{i}"))
    m = agg.model(1)
    for (_, got), (_, ex) in zip(m.layers, exact_fedavg(ups), strict=True):
        np.testing.assert_allclose(got, ex, rtol=1e-5)
    assert agg.progress()["leaf"]["rejected"] == 3


def test_deadline_closes_with_quorum_and_lists_stragglers():
    now = [1000.0]
    rng = np.random.default_rng(9)
    plan = plan_tree({"a": 4, "b": 2}, fan_in=2, levels=3)
    agg = Aggregation(plan, clock=lambda: now[0])
    clients = [f"c{i}" for i in range(6)]
    agg.start_round(1, deadline=1010.0, min_fraction=0.5, clients=clients)
    ups = [(make_model(rng, [(8,)]), 3 + i) for i in range(6)]
    arrived = [0, 1, 4, 2]  # c3 and c5 straggle; node b gets one of its two
    for i in arrived:
        agg.submit(agg.ingest(*ups[i], client=clients[i], node="a" if i < 4 else "b"))
    assert agg.round.state == "open"
    now[0] = 1011.0
    rnd = agg.expire()
    assert rnd.state == "closed" and rnd.stragglers == ["c3", "c5"]
    m = agg.model(1)
    np.testing.assert_allclose(
        m.layers[0][1], exact_fedavg([ups[i] for i in arrived])[0][1], rtol=1e-5
    )
    assert m.n == sum(ups[i][1] for i in arrived)
    with pytest.raises(LateUpdate, match=r"round 1 is closed .* late update from 'c3' rejected"):
        agg.submit(agg.ingest(*ups[3], client="c3", node="a"))


def test_deadline_without_quorum_fails_and_next_round_runs_warm():
    now = [0.0]
    rng = np.random.default_rng(10)
    agg = Aggregation(plan_tree(4, fan_in=2), clock=lambda: now[0])
    agg.start_round(1, deadline=5.0, min_fraction=0.75)
    ups = [(make_model(rng, [(8,)]), 1 + i) for i in range(4)]
    agg.submit(agg.ingest(*ups[0], client="c0"))
    agg.submit(agg.ingest(*ups[1], client="c1"))
    now[0] = 6.0
    with pytest.raises(LateUpdate, match="round 1 is failed"):
        agg.submit(agg.ingest(*ups[2], client="c2"))  # the deadline passed: expires on arrival
    assert agg.round.state == "failed" and "need 3" in agg.round.reason
    with pytest.raises(RoundError, match="no global model"):
        agg.model(1)
    m = agg.run_round(2, ups)
    np.testing.assert_allclose(m.layers[0][1], exact_fedavg(ups)[0][1], rtol=1e-5)
    created = sum(a.accumulators_created for a in agg.aggs.values())
    m = agg.run_round(3, ups[::-1])
    np.testing.assert_allclose(m.layers[0][1], exact_fedavg(ups)[0][1], rtol=1e-5)
    assert sum(a.accumulators_created for a in agg.aggs.values()) == created  # warm: no new buffers


def test_duplicate_update_rejected():
    rng = np.random.default_rng(11)
    agg = Aggregation(plan_tree(3, fan_in=3))
    agg.start_round(1)
    agg.submit(agg.ingest(make_model(rng, [(4,)]), 1, client="x"))
    with pytest.raises(DuplicateUpdate, match="'x' already submitted"):
        agg.submit(agg.ingest(make_model(rng, [(4,)]), 1, client="x"))


def test_peak_memory_bounded_and_no_allocations_after_warmup():
    rng = np.random.default_rng(12)
    fan_in = 4
    plan = plan_tree({"a": 16, "b": 9}, fan_in=fan_in, levels=3)
    agg = Aggregation(plan)
    shapes = [(200, 50), (50,)]
    agg.meter.model_bytes = sum(int(np.prod(s)) for s in shapes) * 4
    for rid in (1, 2, 3):
        ups = [(make_model(rng, shapes), int(rng.integers(1, 100))) for _ in range(25)]
        nodes = ["a"] * 16 + ["b"] * 9
        before = sum(a.accumulators_created for a in agg.aggs.values())
        m = agg.run_round(rid, ups, nodes=nodes)
        np.testing.assert_allclose(m.layers[0][1], exact_fedavg(ups)[0][1], rtol=1e-5)
        if rid == 3:
            assert sum(a.accumulators_created for a in agg.aggs.values()) == before
    for name in agg.aggs:
        # accumulators (2, +header room) + the one input being folded; the top also holds kept models
        extra = 3 if name == plan.top.name else 0
        assert agg.meter.peak_models(name) <= fan_in + 2 + extra + 0.01, (
            name,
            agg.meter.peak_models(name),
        )
    for a in agg.aggs.values():
        if a.acc is not None:
            assert len(a.acc.buffers) == 2
            assert a.acc.nbytes < 2.1 * agg.meter.model_bytes + (1 << 20)
    assert list(agg.aggs[plan.top.name].book.models) == [1, 2, 3]


def test_payload_errors_name_the_field():
    with pytest.raises(PackError, match="bad magic|magic"):
        parse(b"XXXX" + bytes(60))
    good = pack([("a", np.ones(4, np.float32))], 3)
    with pytest.raises(PackError, match="data region holds"):
        parse(bytes(good[:-4]))
    with pytest.raises(PackError, match="too short"):
        parse(b"HF")
    with pytest.raises(PackError, match="header.n"):
        parse(pack([("a", np.ones(4, np.float32))], 0))
    with pytest.raises(PackError, match=r"layer 'a': dtype complex64"):
        pack([("a", np.ones(2, np.complex64))], 1)
    with pytest.raises(PackError, match="duplicate"):
        pack([("a", np.ones(2, np.float32)), ("a", np.ones(2, np.float32))], 1)


def test_pack_roundtrip_keeps_structure_and_aligns():
    layers = [
        ("a", np.arange(3, dtype=np.float16)),
        ("b", np.ones((2, 3), np.float32)),
        ("c", np.arange(2, dtype=np.int64)),
    ]
    p = parse(pack(layers, 9, round=4, client="z"))
    assert (p.header.n, p.header.round, p.header.client) == (9, 4, "z")
    for (n1, a1), (n2, a2) in zip(p.layers(), layers, strict=True):
        assert n1 == n2 and a1.dtype == a2.dtype and a1.shape == a2.shape and np.array_equal(a1, a2)
        assert a1.ctypes.data % a1.dtype.itemsize == 0


def test_integer_layers_average_like_flower():
    rng = np.random.default_rng(13)
    ups = [
        (
            [
                ("w", rng.uniform(1, 2, 6).astype(np.float32)),
                ("steps", np.array([i * 10], np.int64)),
            ],
            i + 1,
        )
        for i in range(5)
    ]
    m = Aggregation(plan_tree(5, fan_in=2)).run_round(1, ups)
    flower = aggregate([([a for _, a in u], n) for u, n in ups])
    for (_, got), ref in zip(m.layers, flower, strict=True):
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_bursts_fold_in_groups_and_still_equal_flower(seed, pool):
    plan, updates, nodes = random_case(100 + seed)
    agg = Aggregation(plan, pool=pool)
    for rid in (1, 2):
        agg.start_round(rid)
        items = [
            agg.ingest(m, n, client=f"c{i}", node=nodes[i]) for i, (m, n) in enumerate(updates)
        ]
        assert agg.submit_many(items) == [None] * len(items)
        assert all(it.slot is None for it in items)  # every slot released after its fold
        model = agg.model(rid)
        flower = aggregate([([a for _, a in m], n) for m, n in updates])
        for (_, got), ref in zip(model.layers, flower, strict=True):
            assert got.shape == ref.shape and got.dtype == ref.dtype
            np.testing.assert_allclose(got, ref, rtol=1e-5)
    agg.close()


def test_burst_with_bad_updates_rejects_exactly_those(pool):
    rng = np.random.default_rng(21)
    plan = plan_tree({"a": 7}, fan_in=7, levels=1)  # one aggregator takes the whole burst
    agg = Aggregation(plan, pool=pool)
    agg.start_round(1, deadline=agg.clock() + 60, min_fraction=0.5)
    ups = [(make_model(rng, [(300,), (5, 5)]), 10 + i) for i in range(7)]
    bad = {2, 5}
    items = []
    for i, (m, n) in enumerate(ups):
        if i in bad:
            m = [(nm, a.copy()) for nm, a in m]
            m[0][1][299] = np.inf if i == 2 else np.nan
        items.append(agg.ingest(m, n, client=f"c{i}", node="a"))
    for a in agg.aggs.values():
        a.trace = []
    slot_mem = [np.frombuffer(it.slot.buf, np.uint8) for it in items]
    errs = agg.submit_many(items)
    assert [i for i, e in enumerate(errs) if e is not None] == sorted(bad)
    assert "non-finite" in str(errs[2]) and "layer0.weight" in str(errs[5])
    # the grouped pass read the slots in place
    top = agg.aggs[plan.top.name]
    assert top.trace and all(any(np.shares_memory(t, s) for s in slot_mem) for t in top.trace)
    agg.expire(agg.clock() + 120)
    good = [ups[i] for i in range(7) if i not in bad]
    m = agg.model(1)
    for (_, got), (_, ex) in zip(m.layers, exact_fedavg(good), strict=True):
        np.testing.assert_allclose(got, ex, rtol=1e-5)
    assert m.n == sum(n for _, n in good)
    agg.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_fold_batch_refolds_a_bad_group_one_by_one_and_rejects_only_the_bad_update(threads):
    rng = np.random.default_rng(22)
    ups = [(make_model(rng, [(1000,)]), 3 + i) for i in range(4)]
    ups[3][0][0][1][10] = np.nan
    lay = Layout.of(ups[0][0])
    a = Accumulator(lay, threads=threads, chunk=128)  # 2 threads: the chunks are split
    a.fold(pack(*ups[0]))  # not first: the group goes to the spare accumulator
    before = a.value.copy()
    errs = a.fold_batch([(parse(pack(m, n)), n, f"c{i}") for i, (m, n) in enumerate(ups)])
    assert [e is None for e in errs] == [True, True, True, False]
    ref = before + sum(np.float32(n) * m[0][1] for m, n in ups[:3])
    np.testing.assert_allclose(a.value, ref, rtol=1e-6)
    assert a.count == 4 and a.n == ups[0][1] + sum(n for _, n in ups[:3])


@pytest.mark.parametrize("count", [5, 6, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_validated_groups_fold_in_place_and_divide_in_place_with_threads(threads, count):
    """The round endpoint's path: validated updates fold in place in groups of 4 and then 1, 2
    or 3, the model is divided in place; split over 2 threads it is the same model."""
    rng = np.random.default_rng(31)
    shapes = [(300, 7), (5,), (4000,)]
    ups = [(make_model(rng, shapes), 2 + 3 * i) for i in range(count)]
    a = Accumulator(Layout.of(ups[0][0]), check="precheck", threads=threads, chunk=256)
    errs = a.fold_batch(
        [(parse(pack(m, n)), n, f"c{i}") for i, (m, n) in enumerate(ups)],
        validated=True,
        last=True,  # the last pass (2 or 3 inputs; not 1) divides by Σn: no division pass
    )
    assert errs == [None] * count and a.count == count
    assert a.divided == (count % 4 > 1)
    if a.divided:  # the buffer holds the model now: no fold may add to it
        with pytest.raises(RuntimeError, match="divided"):
            a.fold_batch([(parse(pack(*ups[0])), ups[0][1], "again")], validated=True)
    model = parse(a.finalize_in_place(round=1))
    for (_, got), (_, ex) in zip(model.layers(), exact_fedavg(ups), strict=True):
        np.testing.assert_allclose(got, ex, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_in_place_passes_use_the_one_array_kernels_and_match_the_two_array_ones(k, monkeypatch):
    """A pass written in place (``out`` is the accumulator: the round endpoint's one buffer)
    runs the one-array kernels: the two-array ones, given one array twice, fail LLVM's overlap
    check and run scalar, 3-5x slower. Same arithmetic in the same order: bit-identical
    results, with and without the last pass's division, in a first and in a later pass."""
    from hearth.functions.fedavg import foldpasses as fp

    calls: list[str] = []

    def spy(name, fn):
        def run(*a):
            calls.append(name)
            return fn(*a)

        return run

    monkeypatch.setattr(fp, "k_add_ip", spy("ip", fp.k_add_ip))
    monkeypatch.setattr(fp, "k_add", spy("two", fp.k_add))
    monkeypatch.setattr(
        fp, "GROUP_KERNELS_IP", {g: spy("ip", f) for g, f in fp.GROUP_KERNELS_IP.items()}
    )
    monkeypatch.setattr(
        fp, "GROUP_KERNELS", {g: spy("two", f) for g, f in fp.GROUP_KERNELS.items()}
    )
    rng = np.random.default_rng(43)
    m = 5000
    srcs = [[(rng.standard_normal(m).astype(np.float32), 0)] for _ in range(k)]
    scales = [np.float32(3 + i) for i in range(k)]
    tasks = [(0, s, min(m, s + 1024)) for s in range(0, m, 1024)]
    start = rng.standard_normal(m).astype(np.float32)
    for first in (True, False):
        for d in [None] + ([np.float32(17)] if k > 1 else []):
            two = np.empty(m, np.float32)
            calls.clear()
            fp.fold_group_chunks(tasks, srcs, scales, acc=start, out=two, first=first, d=d)
            assert set(calls) <= {"two"}  # distinct buffers (or a first pass: k_first)
            one = start.copy()
            calls.clear()
            fp.fold_group_chunks(tasks, srcs, scales, acc=one, out=one, first=first, d=d)
            assert set(calls) == (set() if first and k == 1 else {"ip"})
            np.testing.assert_array_equal(one, two)
    # the single-update pass (Accumulator.fold in place, precheck) takes the one-array kernel
    acc = Accumulator(Layout.of([("w", srcs[0][0][0])]), check="precheck", chunk=1024)
    acc.fold_model([("w", srcs[0][0][0])], 2)
    calls.clear()
    acc.fold_model([("w", srcs[-1][0][0])], 3)
    assert calls and set(calls) == {"ip"}
    want = np.float32(2) * srcs[0][0][0] + np.float32(3) * srcs[-1][0][0]
    np.testing.assert_allclose(acc.value, want, rtol=1e-6, atol=1e-6)  # FMA: one rounding


def test_burst_refuses_duplicate_clients_and_frees_their_slots(pool):
    rng = np.random.default_rng(23)
    plan = plan_tree({"a": 4}, fan_in=4, levels=1)
    agg = Aggregation(plan, pool=pool)
    agg.start_round(1, deadline=agg.clock() + 60, min_fraction=0.5)
    ups = [(make_model(rng, [(200,)]), 5 + i) for i in range(3)]
    used = pool.stats()["used"]
    items = [
        agg.ingest(m, n, client=c, node="a")
        for (m, n), c in zip(ups, ["c0", "c1", "c0"], strict=True)
    ]
    errs = agg.submit_many(items)
    assert errs[0] is None and errs[1] is None
    assert isinstance(errs[2], RoundError) and "already submitted" in str(errs[2])
    assert pool.stats()["used"] == used  # the refused update's slot went back too
    agg.expire(agg.clock() + 120)
    m = agg.model(1)
    for (_, got), (_, ex) in zip(m.layers, exact_fedavg(ups[:2]), strict=True):
        np.testing.assert_allclose(got, ex, rtol=1e-5)
    agg.close()


@pytest.mark.parametrize("first", [True, False], ids=["first-pass", "later-pass"])
def test_precheck_batch_of_unchecked_updates_refuses_only_the_bad_one(first):
    """check="precheck" keeps one accumulator, written in place: unchecked updates are checked
    before a later pass, and the round's first pass (which writes the accumulator from
    scratch) is refolded one by one when it meets a NaN. Either way only the bad update is
    refused and the sum is exactly that of the others."""
    rng = np.random.default_rng(41)
    shapes = [(500,), (3, 70)]
    ups = [(make_model(rng, shapes), 2 + i) for i in range(6)]  # passes of 4, then 2
    ups[2][0][1][1][2, 69] = np.nan  # in the last chunk of the last layer
    a = Accumulator(Layout.of(ups[0][0]), check="precheck", chunk=64)
    base = np.zeros(a.total, np.float32)
    if not first:
        lead = make_model(rng, shapes)
        a.fold(pack(lead, 7))
        base = a.value.copy()
    errs = a.fold_batch(
        [(parse(pack(m, n)), n, f"c{i}") for i, (m, n) in enumerate(ups)],
        validated=[False, True, False, True, False, True],  # only c2 (unchecked) is bad
        last=True,  # a refused update: the round is not complete, the pass must not divide
    )
    assert not a.divided
    assert [e is None for e in errs] == [True, True, False, True, True, True]
    assert "non-finite" in str(errs[2]) and "'c2'" in str(errs[2])
    good = [u for i, u in enumerate(ups) if i != 2]
    ref = base.astype(np.float64) + sum(
        n * np.concatenate([w.ravel() for _, w in m]).astype(np.float64) for m, n in good
    )
    np.testing.assert_allclose(a.value, ref, rtol=1e-6)
    assert a.count == 5 + (not first)
    assert a.n == sum(n for _, n in good) + (0 if first else 7)
