"""Synthetic traces have the published statistics, and the analyser recovers them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hearth.functions.replay import analyze as A
from hearth.functions.replay import figure_runner as FR
from hearth.functions.replay import readers as R
from hearth.functions.replay import synth as Y
from hearth.functions.replay import trace_columns as TC
from scipy import stats
from trace_data import DATA


def test_distribution_parameter_conversions_roundtrip():
    mu, sigma = Y.lognormal_params(3.24, 7.10)
    assert Y.lognormal_moments(mu, sigma) == pytest.approx((3.24, 7.10))
    k, lam = Y.weibull_params(1.25, 3.66)
    assert Y.weibull_moments(k, lam) == pytest.approx((1.25, 3.66))
    assert 0.3 < k < 0.5  # heavy-tailed: shape well below 1


def test_weibull_mle_recovers_known_parameters():
    rng = np.random.default_rng(3)
    x = 2.0 * rng.weibull(0.6, 100_000)
    k, lam = A.weibull_mle(x)
    assert k == pytest.approx(0.6, rel=0.02) and lam == pytest.approx(2.0, rel=0.03)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    p = Y.SynthParams(rows=120_000, seed=11, regions=2, requests_per_pod_mean=2.0)
    Y.write_dataset(p, out, fmt="csv", daily=True, with_requests=True)
    return out


def test_synthetic_files_are_labelled_and_readable(synth_dir, tmp_path):
    files = R.list_files(synth_dir / "cold_start")
    assert len(files) == 2 and all(f.name.startswith("day") for f in files)
    label = Y.read_label(files[0])
    assert label["synthetic"] is True and label["params"]["seed"] == 11
    cold = R.read_coldstarts(synth_dir / "cold_start")
    assert cold.height == 120_000
    assert R.check_identity(cold, abs_tol=1e-9).violations == 0
    # parquet keeps the label in the key-value metadata
    pq = Y.write_frame(
        cold.head(10), tmp_path / "x.parquet", Y.SynthParams().metadata("huawei-coldstart")
    )
    assert Y.read_label(pq)["synthetic"] is True
    assert R.read_coldstarts(pq).height == 10
    # same seed, same data
    again, _ = Y.coldstarts(Y.SynthParams(rows=1000, seed=5))
    once, _ = Y.coldstarts(Y.SynthParams(rows=1000, seed=5))
    assert again.equals(once)


def test_analyser_recovers_published_fits(synth_dir, tmp_path):
    doc = A.run([[synth_dir]], tmp_path / "rep")
    st = doc["traces"][0]
    ln = st["fit_coldstart_lognormal"]
    # sd of a heavy-tailed LogNormal is noisy from 120k samples: 15%; mean 5%
    assert ln["mean"] == pytest.approx(3.24, rel=0.05)
    assert ln["sd"] == pytest.approx(7.10, rel=0.15)
    assert ln["ks_vs_published"] < 0.01 and ln["ks_vs_fit"] < 0.01
    wb = st["fit_interarrival_weibull"]
    assert wb["mean"] == pytest.approx(1.25, rel=0.05)
    assert wb["sd"] == pytest.approx(3.66, rel=0.15)
    assert wb["ks_vs_published"] < 0.02
    # components: shares sum to 1, dependency phase absent for some functions
    sh = st["components"]["share_of_total_time"]
    assert sum(sh.values()) == pytest.approx(1.0, abs=1e-6)
    assert st["identity"]["violations"] == 0
    # group CDF stats exist for every grouping, runtime/trigger via the runtime table
    assert set(st["cdf"]) == {"region", "cluster", "pool", "runtime", "trigger"}
    assert set(st["cdf"]["region"]) == {"R1", "R2"}
    # Java was made slower than Go in the generator: the analyser sees it
    assert st["cdf"]["runtime"]["Java"]["median"] > st["cdf"]["runtime"]["Go"]["median"]
    # per-request analyses
    pf = st["per_function"]
    assert 0 < pf["overall_coldstart_rate"] <= 1
    assert pf["spearman_requests_vs_coldstarts"] > 0.5
    pu = st["pod_utility"]
    assert pu["pods"] > 100_000 and 0 < pu["fraction_below_1"] < 1
    assert set(st["peak_to_trough"]) == {"R1", "R2"}
    # files
    out = tmp_path / "rep"
    saved = json.loads((out / "stats.json").read_text())
    assert saved["traces"][0]["core"]["overall"]["count"] == 120_000
    for f in doc["figures"]:
        assert (out / f).stat().st_size > 5_000
    html = (out / "report.html").read_text()
    assert "fit_coldstart.png" in html and "pod_utility.png" in html


def test_core_statistics_match_numpy():
    cold, _ = Y.coldstarts(Y.SynthParams(rows=5000, seed=2, regions=2))
    cold = R.with_pool_and_funcid(cold, cold.columns)
    st = A.core_statistics(cold)
    r1 = cold.filter(pl.col("region") == "R1")["totalCost_cold_start"].to_numpy()
    assert st["by_region"]["R1"]["count"] == r1.size
    assert st["by_region"]["R1"]["p50"] == pytest.approx(np.quantile(r1, 0.5))
    assert st["by_region"]["R1"]["p99"] == pytest.approx(np.quantile(r1, 0.99))
    assert st["overall"]["mean"] == pytest.approx(cold["totalCost_cold_start"].mean())


def test_compare_two_traces_side_by_side(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    Y.write_dataset(Y.SynthParams(rows=4000, seed=1), a)
    Y.write_dataset(Y.SynthParams(rows=4000, seed=2, coldstart_mean=1.0, coldstart_sd=1.0), b)
    doc = A.run([[a], [b]], tmp_path / "cmp", labels=["public-like", "fast"])
    m = [t["fit_coldstart_lognormal"]["mean"] for t in doc["traces"]]
    assert m[0] > 2 * m[1]
    assert "public-like" in (tmp_path / "cmp" / "report.html").read_text()


def test_analyse_real_sample_rows(tmp_path):
    src = DATA / "huawei_2025_notebook_excerpts"
    doc = A.run(
        [
            [
                src / "cold_starts_R2_head_day0_tail_day30.csv",
                src / "R2_funcID_runtime_triggerType_head_tail.csv",
            ]
        ],
        tmp_path,
    )
    st = doc["traces"][0]
    assert st["core"]["overall"]["count"] == 10
    assert st["identity"]["violations"] == 0
    assert math.isfinite(st["fit_coldstart_lognormal"]["mu"])


def test_no_coldstart_table_is_a_clear_error(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("app,func,end_timestamp,duration\na,f,1.0,0.5\n")
    with pytest.raises(A.AnalysisError, match="no cold-start table"):
        A.run([[p]], tmp_path / "o")


def test_simulate_uses_the_controller_simulator(tmp_path):
    from hearth.controller.simulate import simulate
    from hearth.functions.replay import schedule as SC
    from hearth.functions.replay import simulate as SIM

    Y.write_dataset(
        Y.SynthParams(rows=1500, seed=4, requests_per_pod_mean=3.0),
        tmp_path / "t",
        with_requests=True,
    )
    paths = [tmp_path / "t" / "per_request", tmp_path / "t" / "cold_start"]
    doc = SIM.run(paths, tmp_path / "sim", policies=["fixed:60", "fixed:600"], window_s=3600.0)
    r = {x["policy"]: x for x in doc["results"]}
    # a longer fixed TTL trades idle memory for fewer cold starts
    assert r["fixed:600"]["cold_start_pct"] < r["fixed:60"]["cold_start_pct"]
    assert r["fixed:600"]["idle_memory_gb_s"] > r["fixed:60"]["idle_memory_gb_s"]
    assert (
        sum(c["invocations"] for c in r["fixed:60"]["per_class"].values())
        == r["fixed:60"]["invocations"]
    )
    assert (tmp_path / "sim" / "pareto.png").stat().st_size > 10_000
    # same numbers as calling the controller's simulator directly on the same arrivals
    arr = SC.build_from_paths(paths, SC.ScheduleParams(duration_s=3600.0)).arrivals()
    assert r["fixed:60"]["invocations"] == sum(a.size for a in arr.values())
    direct = simulate(arr, ["fixed:60"], memory_mb=256.0, cold_start_s=1.0, exec_s=0.1)[0]
    assert direct.invocations == r["fixed:60"]["invocations"]


def test_cli_synth_info_analyze_compare(tmp_path):
    import subprocess
    import sys

    def hearth(*args):
        return subprocess.run(
            [sys.executable, "-m", "hearth.cli", *map(str, args)], capture_output=True, text=True
        )

    p = hearth(
        "trace",
        "synth",
        "--out",
        tmp_path / "a",
        "--rows",
        3000,
        "--seed",
        3,
        "--format",
        "csv.gz",
        "--requests",
    )
    assert p.returncode == 0, p.stderr
    assert "huawei-coldstart: 1 file(s)" in p.stdout
    p = hearth("trace", "info", tmp_path / "a", "--json")
    assert p.returncode == 0, p.stderr
    info = {e["kind"]: e for e in json.loads(p.stdout)}
    assert (
        info["huawei-coldstart"]["rows"] == 3000 and info["huawei-coldstart"]["synthetic"] is True
    )
    assert info["huawei-coldstart"]["identity"]["violations"] == 0
    assert (
        hearth("trace", "synth", "--out", tmp_path / "b", "--rows", 2000, "--seed", 4).returncode
        == 0
    )
    p = hearth(
        "coldstarts",
        "analyze",
        tmp_path / "a",
        tmp_path / "b",
        "--compare",
        "--out",
        tmp_path / "rep",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("cold starts, mean") == 2
    doc = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert [t["core"]["overall"]["count"] for t in doc["traces"]] == [3000, 2000]
    p = hearth("trace", "synth", "--out", tmp_path / "c", "--format", "xlsx")
    assert p.returncode == 1 and p.stderr.startswith("error: --format")


def test_hearth_exported_coldstarts_and_replay_agreement(tmp_path):
    """Hearth's own export (controller.coldstarts, Huawei columns + fromPool) reads like the
    public table, and replay records are checked against it."""
    from hearth.controller import coldstarts as CS

    recs = []
    t = 1_700_000_000.0
    for i in range(40):
        ph = dict(
            zip(
                CS.LOCAL_PHASES,
                [t + i, t + i + 0.01, t + i + 0.05, t + i + 0.3, t + i + 0.31, t + i + 0.5],
                strict=True,
            )
        )
        recs.append(
            CS.from_local_phases(
                ph,
                function=f"fn{i % 4}",
                pod=CS.pod_id(500, 256, i),
                request_id=f"inv-{i}",
                origin=t,
            )
        )
    path = tmp_path / "hearth_coldstarts.csv"
    CS.to_huawei_csv(recs, path)
    cold = R.read_coldstarts(path)
    assert cold.height == 40 and "fromPool" in cold.columns
    assert cold["poolName"][0] == "pool00-500-256"
    assert R.check_identity(cold).violations == 0
    # replay records: the first invocation on each pod is cold, later ones warm
    pods = cold["podID"].to_list()
    rec = pl.DataFrame(
        {"podID": pods + pods, "cold": [True] * 40 + [False] * 40, "funcName": ["fn"] * 80}
    )
    ok = A.cold_agreement(rec, cold)
    assert ok["agree"] and ok["instances_flagged_cold"] == 40 and ok["matched_on"] == "podID"
    # a second cold flag on a recorded instance (queued behind its cold start) still agrees
    two = rec.with_columns(
        pl.when(pl.int_range(80) == 45).then(True).otherwise(pl.col("cold")).alias("cold")
    )
    res = A.cold_agreement(two, cold)
    assert res["agree"] and res["instances_with_several_cold_flags"] == 1
    # a cold flag on an instance Hearth never recorded does not
    ghost = pl.concat(
        [rec, pl.DataFrame({"podID": ["ghost-1"], "cold": [True], "funcName": ["fn"]})]
    )
    assert not A.cold_agreement(ghost, cold)["agree"]
    # recorded instances reached warm (started ahead of demand) are reported
    half = rec.with_columns((pl.col("cold") & (pl.int_range(80) < 20)).alias("cold"))
    res = A.cold_agreement(half, cold)
    assert res["agree"] and res["recorded_instances_reached_warm"] == 20
    # Hearth's own export keeps the instance id in requestID: matched there
    by_req = rec.with_columns(pl.col("podID").str.replace("^pool00", "x"))
    cold2 = cold.with_columns(pl.col("podID").str.replace("^pool00", "x").alias("requestID"))
    res = A.cold_agreement(by_req, cold2)
    assert res["matched_on"] == "requestID" and res["agree"]
    doc = A.run([[path]], tmp_path / "rep")
    assert doc["traces"][0]["core"]["overall"]["count"] == 40


def test_hearth_exported_coldstarts_get_a_cdf_by_origin(tmp_path):
    """Hearth's own export says where each start came from (fromPool): the report draws its
    cold starts by origin, warm pool against new instance, with each group's count and
    quantiles; a public table (no fromPool) has no such group."""
    from hearth.controller import coldstarts as CS

    t, recs = 1_700_000_000.0, []
    for i in range(12):
        pool = i % 3 == 0  # 4 from the pool (2 ms), 8 new (20 ms)
        cost = 0.002 if pool else 0.020
        ph = dict(
            zip(
                CS.LOCAL_PHASES,
                [t + i, t + i, t + i, t + i + cost / 2, t + i + cost / 2, t + i + cost],
                strict=True,
            )
        )
        pod = CS.pod_id(500, 256, i)
        recs.append(CS.from_local_phases(ph, function="fn", pod=pod, from_pool=pool, origin=t))
    path = tmp_path / "hearth_coldstarts.csv"
    CS.to_huawei_csv(recs, path)
    doc = A.run([[path]], tmp_path / "rep")
    origin = doc["traces"][0]["cdf"]["origin"]
    assert {k: v["n"] for k, v in origin.items()} == {"warm pool": 4, "new instance": 8}
    assert origin["warm pool"]["median"] == pytest.approx(0.002, rel=0.01)
    assert origin["new instance"]["median"] == pytest.approx(0.020, rel=0.01)
    assert (tmp_path / "rep" / "cdf_origin.png").stat().st_size > 1000
    assert "cdf_origin.png" in (tmp_path / "rep" / "report.html").read_text()
    # the public table's columns alone: no origin
    public = tmp_path / "public.csv"
    pl.read_csv(path).drop("fromPool").write_csv(public)
    doc = A.run([[public]], tmp_path / "rep2")
    assert "origin" not in doc["traces"][0]["cdf"]
    assert not (tmp_path / "rep2" / "cdf_origin.png").exists()


def test_quantiles_from_one_sort_equal_numpy():
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 1001):
        x = rng.lognormal(0.3, 1.3, n)
        x[: n // 3] = np.round(x[: n // 3], 1)  # ties
        q = (0.0, 0.01, 0.5, 0.9, 0.99, 1.0)
        got = A.quantiles_sorted(np.sort(x), q)
        np.testing.assert_allclose(got, np.quantile(x, q), rtol=1e-15, atol=0)
    assert np.isnan(A.quantiles_sorted(np.sort(np.array([1.0, np.nan, 2.0])))).all()
    # per-group values from the shared sort: each group's own sorted values
    x = rng.exponential(size=5000)
    codes = rng.integers(0, 5, x.size)
    srt = A.SortedTotals(x)
    vals, offs = srt.by_group(codes, 5)
    for g in range(5):
        np.testing.assert_array_equal(vals[offs[g] : offs[g + 1]], np.sort(x[codes == g]))


def test_single_threaded_sort_and_ranks_equal_numpy_and_polars():
    """The analysis sorts and ranks with polars on one thread; same results as np.sort and
    polars' rank("average"), with ties, NaN (last, tied with each other) and nulls."""
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 7, 5000):
        x = rng.lognormal(0.0, 1.0, n)
        x[: n // 2] = np.round(x[: n // 2], 1)  # many ties
        if n > 3:
            x[[1, n - 2]] = np.nan
        np.testing.assert_array_equal(A.sorted_values(x), np.sort(x))
        np.testing.assert_array_equal(x[A.sort_order(x)], np.sort(x))
        s = pl.Series("v", x)
        want = s.rank("average").cast(pl.Float64).to_numpy()
        np.testing.assert_array_equal(A.average_ranks(s), want)
    s = pl.Series("v", [2.0, None, 1.0, 2.0])
    got = A.average_ranks(s)
    assert np.isnan(got[1]) and list(got[[0, 2, 3]]) == [2.5, 1.0, 2.5]
    assert list(A.average_ranks(pl.Series([3, 1, 3, 2]))) == [3.5, 1.0, 3.5, 2.0]


def test_interarrival_gaps_stay_within_regions_and_fill_ties():
    """Gaps are taken within each region (one-region traces by a plain float sort, others by
    region and time); zero gaps (ties) become half the smallest positive gap."""
    one = pl.DataFrame({"region": ["R1"] * 5, "time": [4.0, 1.0, 1.0, 2.5, 2.0]})
    # sorted 1, 1, 2, 2.5, 4 -> gaps 0, 1, 0.5, 1.5; the tie becomes 0.5 / 2
    np.testing.assert_array_equal(np.sort(A.interarrival_gaps(one)), [0.25, 0.5, 1.0, 1.5])
    two = pl.DataFrame(
        {"region": ["a", "b", "a", "b", "a"], "time": [0.0, 100.0, 3.0, 101.0, 3.0]}
    )  # a: 0, 3, 3 -> gaps 3, 0; b: 100, 101 -> 1; no gap across regions; the tie -> 1 / 2
    np.testing.assert_array_equal(np.sort(A.interarrival_gaps(two)), [0.5, 1.0, 3.0])
    no_ties = pl.DataFrame({"region": ["R"] * 3, "time": [0.0, 1.0, 3.0]})
    np.testing.assert_array_equal(A.interarrival_gaps(no_ties), [1.0, 2.0])


def test_group_codes_name_every_row_and_missing_keys():
    s = pl.Series(["b", None, "a", "b", "c", None])
    g = A.group_codes(s)
    assert g.names == sorted(["a", "b", "c", A.MISSING])
    assert [g.names[c] for c in g.codes] == ["b", A.MISSING, "a", "b", "c", A.MISSING]
    # a process-wide mapping holds other strings too: codes then come from the values present
    pl.Series(["zz", "a"]).cast(pl.Categorical())
    shared = TC._codes_of(s.cast(pl.Categorical()))
    assert shared.names == g.names and list(shared.codes) == list(g.codes)


def test_downsampled_cdf_stays_within_tolerance_of_exact_ecdf():
    rng = np.random.default_rng(1)
    v = np.sort(rng.lognormal(0.3, 1.3, 300_000))
    x, y = A.cdf_points(v)
    assert x.size <= A.CDF_POINTS and x[0] == v[0] and x[-1] == v[-1] and y[-1] == 1.0
    # the drawn step curve (post) vs the exact ECDF, at probe points over the whole range
    probes = np.concatenate([v[::97], rng.uniform(v[0], v[-1], 2000)])
    exact = np.searchsorted(v, probes, side="right") / v.size
    i = np.searchsorted(x, probes, side="right") - 1
    drawn = np.where(i >= 0, y[np.maximum(i, 0)], 0.0)
    assert np.max(np.abs(drawn - exact)) <= 1.0 / (A.CDF_POINTS - 1) + 1e-12
    # the curve's points are exact quantiles: y is the ECDF at x
    np.testing.assert_allclose(y, np.searchsorted(v, x, side="right") / v.size)
    # groups: exact n / median / p99 on all rows, curves from the same sort
    codes = rng.integers(0, 12, v.size)  # 12 groups: 8 largest + "other"
    g = A.Groups([f"g{i:02d}" for i in range(12)], codes)
    res = A.group_cdfs(A.SortedTotals(v), g)
    assert len(res) == A.MAX_GROUPS + 1 and "other" in res
    assert sum(r["n"] for r in res.values()) == v.size
    name = next(k for k in res if k != "other")
    sel = v[codes == int(name[1:])]
    assert res[name]["median"] == pytest.approx(np.quantile(sel, 0.5), rel=1e-15)
    assert res[name]["p99"] == pytest.approx(np.quantile(sel, 0.99), rel=1e-15)


def test_ks_distances_over_several_blocks_equal_scipy():
    """KS distances are computed block by block (KS_BLOCK points); over several blocks, with
    the block edges inside the data, they equal scipy's one-pass kstest."""
    rng = np.random.default_rng(11)
    n = 3 * A.KS_BLOCK + 12_345
    x = np.sort(rng.lognormal(0.4, 1.1, n))
    f = A.fit_lognormal(x, presorted=True)
    want = stats.kstest(x, stats.lognorm(f["sigma"], scale=math.exp(f["mu"])).cdf).statistic
    assert f["ks_vs_fit"] == pytest.approx(want, rel=1e-9)
    g = np.sort(rng.weibull(0.6, n) * 2.0)
    w = A.fit_weibull(g, presorted=True)
    want = stats.kstest(g, stats.weibull_min(w["shape"], scale=w["scale"]).cdf).statistic
    assert w["ks_vs_fit"] == pytest.approx(want, rel=1e-9)
    c = stats.norm.cdf(np.sort(rng.normal(size=n)))
    assert A.ks_distance(c, c) == pytest.approx(stats.kstest(c, "uniform").statistic, rel=1e-9)


def test_fits_use_all_rows_and_say_what_was_sampled(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.lognormal(0.296, 1.326, 50_000)
    f = A.fit_lognormal(x)
    lx = np.log(x)
    assert f["n"] == x.size and f["mu"] == pytest.approx(lx.mean(), rel=1e-12)
    xs = np.sort(x)
    cdf = stats.norm.cdf((np.log(xs) - f["mu"]) / f["sigma"])
    assert f["ks_vs_fit"] == pytest.approx(A.ks_distance(xs, cdf), abs=1e-12)
    # Weibull: the shape is fitted on a seeded sample, KS on every gap
    gaps = 0.4 * rng.weibull(0.42, 30_000)
    w = A.fit_weibull(gaps, sample=10_000)
    assert w["n"] == 30_000 and w["fit_n"] == 10_000 and w["fit_sampled"] is True
    gs = np.sort(gaps)
    ks = A.ks_distance(gs, stats.weibull_min.cdf(gs, w["shape"], scale=w["scale"]))
    assert w["ks_vs_fit"] == pytest.approx(ks, abs=1e-9)
    full = A.fit_weibull(gaps)
    assert full["fit_sampled"] is False and full["shape"] == pytest.approx(0.42, rel=0.03)


def test_figures_in_two_processes_match_one_and_survive_a_failed_child(tmp_path, monkeypatch):
    cold, _ = Y.coldstarts(Y.SynthParams(rows=3000, seed=3, regions=2))
    tr = A.Trace("t", R.with_pool_and_funcid(cold, cold.columns))
    an = A.analyze_trace(tr)
    for d in ("one", "two", "three"):
        (tmp_path / d).mkdir()
    one = A.figures([an], tmp_path / "one", workers=1)
    two = A.figures([an], tmp_path / "two", workers=2)
    assert one == two and len(one) == 9
    for f, _ in two:
        assert (tmp_path / "two" / f).stat().st_size > 5_000
    # a child that fails leaves its figures to the parent: none is missing
    real = FR._draw

    def broken_in_child(jobs, analyses, out, _pid=os.getpid()):
        if os.getpid() != _pid:
            raise RuntimeError("boom")
        return real(jobs, analyses, out)

    monkeypatch.setattr(FR, "_draw", broken_in_child)
    with pytest.warns(UserWarning, match="boom"):
        three = A.figures([an], tmp_path / "three", workers=2)
    assert three == one
    assert all((tmp_path / "three" / f).exists() for f, _ in three)


def test_bincount_aggregations_equal_polars_group_by():
    cold, _ = Y.coldstarts(Y.SynthParams(rows=20_000, seed=8, regions=3, span_days=5))
    cold = R.with_pool_and_funcid(cold, cold.columns)
    cols = A.Columns(cold, A.GROUP_KEYS)
    # per pool: count and means
    g = cols.groups["pool"]
    count, means = cols.means(g.codes, g.k)
    ref = cold.group_by("poolName").agg(pl.len(), pl.col(A.T).mean()).sort("poolName")
    assert g.names == ref["poolName"].to_list()
    assert count.tolist() == ref["len"].to_list()
    np.testing.assert_allclose(means[A.T], ref[A.T].to_numpy(), rtol=1e-12)
    # per (region, hour), and days summed from the hours == days computed directly
    r, h, m = cols.per_time(3600.0)
    ref = (
        cold.group_by("region", (pl.col("time") // 3600).cast(pl.Int64).alias("h"))
        .agg(pl.len(), pl.col("schedulingCost").mean())
        .sort("region", "h")
    )
    assert [cols.groups["region"].names[i] for i in r] == ref["region"].to_list()
    assert h.tolist() == ref["h"].to_list() and m["count"].tolist() == ref["len"].to_list()
    np.testing.assert_allclose(m["schedulingCost"], ref["schedulingCost"].to_numpy(), rtol=1e-12)
    days, by_day = TC.coarser(h, m, 24)
    _, days2, direct = cols.per_time(86400.0, by_region=False)
    assert days.tolist() == days2.tolist()
    np.testing.assert_allclose(by_day["count"], direct["count"])
    for c in A.COMP:
        np.testing.assert_allclose(by_day[c], direct[c], rtol=1e-12)


def test_peak_to_trough_and_correlations_on_a_known_table():
    # region A: 10 cold starts in hour 0, 20 in hour 1, 40 in hour 2, 30 in hour 3, 5 in hour 4
    per_hour = {0: 10, 1: 20, 2: 40, 3: 30, 4: 5}
    rows = []
    for h, n in per_hour.items():
        rows += [{"region": "A", "time": h * 3600.0 + i, "x": float(h)} for i in range(n)]
    rows += [{"region": "B", "time": 7200.0 + i, "x": 1.0} for i in range(3)]
    df = pl.DataFrame(rows).with_columns(
        pl.col("x").alias(A.T),
        *[(pl.col("x") / 4).alias(c) for c in A.COMP],
        pl.lit("f").alias("funcID"),
    )
    p = A.peak_to_trough(df)
    # partial first/last hours are dropped: hours 1-3 remain
    assert (
        p["A"]["hours"] == 3 and p["A"]["peak_per_hour"] == 40 and p["A"]["trough_per_hour"] == 20
    )
    assert p["A"]["peak_to_trough_hourly"] == 2.0 and p["B"]["hours"] == 1
    c = A.correlations(df)
    assert c["rows_sample"] == {"rows": df.height, "of": df.height, "sampled": False}
    assert c["rows"][A.T]["schedulingCost"] == pytest.approx(1.0)
    assert c["per_function"] == {}  # one function: fewer than 3 points
    assert set(c["per_hour"]) == {"coldstarts", A.T, *A.COMP}


GOLDEN = Path(__file__).with_name("coldstart_stats_golden.json")


def _assert_same(new, old, where="stats"):
    """Equal: same keys, same order, same non-float values; floats within 1e-12 relative
    (summation order may differ between CPUs' SIMD paths, not between code versions)."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and list(new) == list(old), where
        for k in old:
            _assert_same(new[k], old[k], f"{where}.{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(old, float):
        assert new == pytest.approx(old, rel=1e-12, abs=1e-15), where
    else:
        assert new == old and type(new) is type(old), where


def test_statistics_equal_those_of_the_reference_version(tmp_path):
    """Speed work must not change results: the JSON statistics of a fixed synthetic trace
    (one trace with runtime table and per-request rows; and two traces compared) equal
    those written by the analyser before it was reorganised (coldstart_stats_golden.json,
    made by commit 1447705)."""
    golden = json.loads(GOLDEN.read_text())
    p = Y.SynthParams(rows=20_000, seed=21, regions=2, requests_per_pod_mean=2.0)
    Y.write_dataset(p, tmp_path / "t", fmt="csv", daily=True, with_requests=True)
    one = A.run([[tmp_path / "t"]], tmp_path / "rep", labels=["golden"])
    _assert_same(one["traces"], golden["single"])
    cs = tmp_path / "t" / "cold_start"
    two = A.run([[cs], [cs / "R1"]], tmp_path / "rep2", labels=["a", "b"])
    _assert_same(two["traces"], golden["compare"])
    saved = json.loads((tmp_path / "rep" / "stats.json").read_text())
    _assert_same(saved["traces"], golden["single"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_draws_every_figure_with_or_without_the_figure_process(tmp_path, monkeypatch, workers):
    """run() forks a figure process after the analyses (HEARTH_FIGURE_WORKERS=2) or draws
    everything itself (1); either way every figure is there, in report order."""
    monkeypatch.setenv("HEARTH_FIGURE_WORKERS", workers)
    a, b = tmp_path / "a", tmp_path / "b"
    Y.write_dataset(Y.SynthParams(rows=3000, seed=1, regions=2), a, with_requests=True)
    Y.write_dataset(Y.SynthParams(rows=3000, seed=2), b)
    doc = A.run([[a], [b]], tmp_path / "rep", labels=["a", "b"])
    assert doc["timings_s"]["figure_processes"] == int(workers)
    # (the synthetic tables are the public trace's columns: no fromPool, so no origin CDF)
    expected = [f"cdf_{g}.png" for g in A.CDF_TITLES if g != "origin"] + [
        "components_time.png",
        "component_shares.png",
        "fit_coldstart.png",
        "fit_interarrival.png",
        "spearman.png",
        "coldstarts_per_hour.png",
        "requests_vs_coldstarts.png",
        "pod_utility.png",
    ]
    assert doc["figures"] == expected
    for f in expected:
        assert (tmp_path / "rep" / f).stat().st_size > 5_000
    assert [t["label"] for t in doc["traces"]] == ["a", "b"]
    assert all("core" in t and "cdf" in t for t in doc["traces"])
