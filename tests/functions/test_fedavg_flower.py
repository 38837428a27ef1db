"""Flower adapter: HearthFedAvg.aggregate_fit gives FedAvg's result from real FitRes messages."""

from __future__ import annotations

import numpy as np
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg
from hearth.functions.fedavg.flower import HearthFedAvg, npy_view, parameters_to_views


def fit_results(rng, k, shapes, dtype=np.float32):
    out = []
    for _ in range(k):
        arrays = [rng.uniform(0.5, 1.5, s).astype(dtype) for s in shapes]
        out.append(
            (
                None,
                FitRes(
                    Status(Code.OK, ""),
                    ndarrays_to_parameters(arrays),
                    int(rng.integers(1, 300)),
                    {"loss": float(rng.random())},
                ),
            )
        )
    return out


def test_npy_view_reads_flower_tensors_without_copy():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = ndarray_to_bytes(a)
    v = npy_view(b)
    assert v.shape == a.shape and v.dtype == a.dtype and np.array_equal(v, a)
    assert np.shares_memory(v, np.frombuffer(b, np.uint8))
    f = np.asfortranarray(a)
    assert np.array_equal(npy_view(ndarray_to_bytes(f)), f)
    s = np.float32(3.5).reshape(())
    assert npy_view(ndarray_to_bytes(s)).shape == ()


def test_aggregate_fit_matches_fedavg_over_rounds():
    rng = np.random.default_rng(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 16), (10,)]
    mine = HearthFedAvg(fan_in=3, fit_metrics_aggregation_fn=lambda m: {"n": sum(n for n, _ in m)})
    ref = FedAvg(inplace=False)
    for rnd in (1, 2, 3):
        results = fit_results(rng, 7 + rnd, shapes)
        got, metrics = mine.aggregate_fit(rnd, results, [])
        want, _ = ref.aggregate_fit(rnd, results, [])
        g, w = parameters_to_ndarrays(got), parameters_to_ndarrays(want)
        assert [x.shape for x in g] == [x.shape for x in w] and [x.dtype for x in g] == [
            x.dtype for x in w
        ]
        for x, y in zip(g, w, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5)
        assert metrics == {"n": sum(r.num_examples for _, r in results)}
        assert mine.last_progress["leaf"]["folded"] == len(results)


def test_aggregate_fit_reads_the_received_bytes_in_place():
    rng = np.random.default_rng(1)
    results = fit_results(rng, 4, [(50,)])
    strat = HearthFedAvg(fan_in=2)
    strat.aggregate_fit(1, results, [])
    agg = strat._tree
    for a in agg.aggs.values():
        a.trace = []
    results = fit_results(rng, 4, [(50,)])
    strat.aggregate_fit(2, results, [])
    read = [t for a in agg.aggs.values() if a.level == "leaf" for t in a.trace]
    tensors = [np.frombuffer(r.parameters.tensors[0], np.uint8) for _, r in results]
    assert len(read) == 4
    assert all(any(np.shares_memory(t, b) for b in tensors) for t in read)


def test_failures_and_empty_results_follow_fedavg_rules():
    strat = HearthFedAvg(accept_failures=False)
    rng = np.random.default_rng(2)
    assert strat.aggregate_fit(1, [], []) == (None, {})
    assert strat.aggregate_fit(1, fit_results(rng, 2, [(3,)]), [RuntimeError("x")]) == (None, {})


def test_views_fallback_for_other_tensor_types():
    p = ndarrays_to_parameters([np.ones(3, np.float32)])
    assert parameters_to_views(p)[0].tolist() == [1.0, 1.0, 1.0]


def test_a_non_finite_result_is_dropped_and_the_rest_averaged():
    rng = np.random.default_rng(3)
    results = fit_results(rng, 5, [(40,), (3, 3)])
    poisoned = [np.full((40,), np.nan, np.float32), np.ones((3, 3), np.float32)]
    results[2] = (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(poisoned), 7, {}))
    strat = HearthFedAvg(fan_in=2)
    got, _ = strat.aggregate_fit(1, results, [])
    sound = [r for i, r in enumerate(results) if i != 2]
    want, _ = FedAvg(inplace=False).aggregate_fit(1, sound, [])
    for x, y in zip(parameters_to_ndarrays(got), parameters_to_ndarrays(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    all_bad = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(poisoned), 7, {}))] * 2
    assert HearthFedAvg().aggregate_fit(1, all_bad, []) == (None, {})


def test_a_replayed_server_round_is_aggregated_again():
    rng = np.random.default_rng(4)
    strat = HearthFedAvg(fan_in=2)
    results = fit_results(rng, 3, [(8,)])
    a, _ = strat.aggregate_fit(1, results, [])
    b, _ = strat.aggregate_fit(1, results, [])
    np.testing.assert_array_equal(parameters_to_ndarrays(a)[0], parameters_to_ndarrays(b)[0])
