"""Schedule properties: counts per minute preserved, seeds reproducible, scaling, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hearth.functions.replay import readers as R
from hearth.functions.replay import schedule as SC
from hearth.functions.replay import synth as Y
from trace_data import DATA

WIDE = DATA / "huawei_2023_notebook_excerpts" / "private_requests_minute_wide_head_tail.csv"


def _azure2019(tmp_path: Path, nfunc: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d = tmp_path / "azure2019"
    d.mkdir()
    minutes = np.arange(1440)
    shape = 1 + 0.8 * np.sin(2 * np.pi * minutes / 1440)  # diurnal
    rows = []
    for i in range(nfunc):
        lam = rng.lognormal(0, 1.5) * shape
        rows.append([f"o{i % 5}", f"a{i % 10}", f"f{i:03d}", "http", *rng.poisson(lam).tolist()])
    cols = ["HashOwner", "HashApp", "HashFunction", "Trigger", *[str(m) for m in range(1, 1441)]]
    pl.DataFrame(rows, schema=cols, orient="row").write_csv(
        d / "invocations_per_function_md.anon.d01.csv"
    )
    dur_cols = [
        "HashOwner",
        "HashApp",
        "HashFunction",
        "Average",
        "Count",
        "Minimum",
        "Maximum",
    ] + [f"percentile_Average_{p}" for p in (0, 1, 25, 50, 75, 99, 100)]
    drows = [
        [
            f"o{i % 5}",
            f"a{i % 10}",
            f"f{i:03d}",
            50.0,
            10.0,
            1.0,
            900.0,
            1.0,
            2.0,
            20.0,
            50.0,
            80.0,
            500.0,
            900.0,
        ]
        for i in range(nfunc)
    ]
    pl.DataFrame(drows, schema=dur_cols, orient="row").write_csv(
        d / "function_durations_percentiles.anon.d01.csv"
    )
    mem_cols = ["HashOwner", "HashApp", "SampleCount", "AverageAllocatedMb"] + [
        f"AverageAllocatedMb_pct{p}" for p in (1, 5, 25, 50, 75, 95, 99, 100)
    ]
    mrows = [
        [f"o{i % 5}", f"a{i}", 100.0, 150.0, 100.0, 110.0, 130.0, 150.0, 170.0, 190.0, 199.0, 200.0]
        for i in range(10)
    ]
    pl.DataFrame(mrows, schema=mem_cols, orient="row").write_csv(
        d / "app_memory_percentiles.anon.d01.csv"
    )
    return d


def _counts(df: pl.DataFrame, col: str = "trace_t") -> dict:
    g = df.group_by("function", (pl.col(col) // 60).cast(pl.Int64).alias("m")).len()
    return {(f, m): n for f, m, n in g.rows()}


@pytest.mark.parametrize("spread", SC.SPREADS)
def test_per_minute_counts_preserved(tmp_path, spread):
    src = SC.load_source([_azure2019(tmp_path)])
    expect = {
        (f, int(t0 // 60)): c for f, t0, c in src.counts.select("function", "t0", "count").rows()
    }
    s = SC.build(src, SC.ScheduleParams(spread=spread, seed=4))
    assert _counts(s.df) == expect
    assert s.df["t"].is_sorted()
    # every arrival stays inside its minute
    assert ((s.df["trace_t"] >= 0) & (s.df["trace_t"] < 1440 * 60)).all()


def test_real_wide_minute_table_counts_preserved():
    src = SC.load_source([WIDE])
    s = SC.build(src, SC.ScheduleParams(spread="equidistant", seed=1))
    long = R.read_wide(WIDE, long=True)
    expect = {(f, int(t // 60)): int(round(v)) for _, t, f, v in long.rows() if round(v) > 0}
    assert _counts(s.df) == expect


def test_equidistant_is_evenly_spaced_with_shift():
    counts = pl.DataFrame({"function": ["a"], "t0": [0.0], "width": [60.0], "count": [6]})
    t = np.sort(SC.spread_counts(counts, "equidistant", np.random.default_rng(0))["t"].to_numpy())
    assert np.allclose(np.diff(t), 10.0)
    assert 0 <= t[0] < 10.0


@pytest.mark.parametrize("spread", SC.SPREADS)
def test_a_window_without_bins_is_an_empty_schedule(spread):
    """Counts with no bin in the window (the per-second excerpt's gap between head and tail):
    an empty schedule, which the CLI reports as such (it was a numpy broadcast error)."""
    sec = (
        DATA
        / "huawei_2023_notebook_excerpts"
        / "private_requests_second_selected_funcs_head_tail.csv"
    )
    p = SC.ScheduleParams(start_s=60, duration_s=600, spread=spread)
    assert SC.build(SC.load_source([sec]), p).invocations == 0
    empty = pl.DataFrame(
        {"function": [], "t0": [], "width": [], "count": []},
        schema={"function": pl.String, "t0": pl.Float64, "width": pl.Float64, "count": pl.Int64},
    )
    assert SC.spread_counts(empty, spread, np.random.default_rng(0)).height == 0


def test_seed_reproducible_and_exportable(tmp_path):
    src = SC.load_source([_azure2019(tmp_path)])
    p = SC.ScheduleParams(seed=7, duration_s=3600, target_rps=5.0, warmup_s=5.0)
    a, b = SC.build(src, p), SC.build(src, p)
    assert a.df.equals(b.df)
    c = SC.build(src, SC.ScheduleParams(seed=8, duration_s=3600, target_rps=5.0, warmup_s=5.0))
    assert not a.df.equals(c.df)
    for name in ("s.parquet", "s.csv"):
        back = SC.Schedule.read(a.write(tmp_path / name))
        assert back.df.select("seq", "function", "phase").equals(
            a.df.select("seq", "function", "phase")
        )
        assert np.allclose(back.df["t"].to_numpy(), a.df["t"].to_numpy())
        assert back.meta["params"]["seed"] == 7
        assert SC.is_schedule(tmp_path / name)


def test_speed_window_and_compress(tmp_path):
    src = SC.Source(
        exact=pl.DataFrame({"function": ["a", "b", "a", "b"], "t": [100.0, 110.0, 1000.0, 1010.0]}),
        kind="test",
    )
    s = SC.build(src, SC.ScheduleParams(speed=2.0))
    assert s.df["t"].to_list() == [0.0, 5.0, 450.0, 455.0]
    w = SC.build(src, SC.ScheduleParams(start_s=5.0, duration_s=100.0))
    assert w.df["t"].to_list() == [5.0]  # only b@110 is inside [105, 205)
    c = SC.build(src, SC.ScheduleParams(compress_idle_s=30.0))
    assert c.df["t"].to_list() == [0.0, 10.0, 40.0, 50.0]
    assert c.df["trace_t"].to_list() == [100.0, 110.0, 1000.0, 1010.0]


def test_sampling_hits_target_and_keeps_shape(tmp_path):
    src = SC.load_source([_azure2019(tmp_path, nfunc=120, seed=3)])
    full = SC.build(src, SC.ScheduleParams(seed=1))
    full_rate = full.invocations / 86400
    target = full_rate / 4
    s = SC.build(src, SC.ScheduleParams(seed=1, target_rps=target))
    info = s.meta["sampling"]
    assert abs(info["sampled_rate"] - target) / target < 0.1
    assert info["functions"] < 120

    # the per-hour shape of the sample follows the full trace's (diurnal)
    def hourly(df):
        h = np.bincount((df["trace_t"].to_numpy() // 3600).astype(int), minlength=24).astype(float)
        return h / h.sum()

    assert np.corrcoef(hourly(full.df), hourly(s.df))[0, 1] > 0.8
    # speed factor: target is in replay time
    s2 = SC.build(src, SC.ScheduleParams(seed=1, target_rps=target * 10, speed=10))
    assert abs(s2.meta["sampling"]["sampled_rate"] - target) / target < 0.1


def test_durations_and_memory_from_percentiles(tmp_path):
    src = SC.load_source([_azure2019(tmp_path)])
    s = SC.build(src, SC.ScheduleParams(seed=2, duration_s=7200))
    d = s.df["duration_ms"].to_numpy()
    assert d.min() >= 1.0 and d.max() <= 900.0
    assert np.median(d) == pytest.approx(50.0, rel=0.1)
    m = s.df["memory_mb"].to_numpy()
    assert m.min() >= 100.0 and m.max() <= 200.0


def test_warmup_follows_littles_law():
    t = np.arange(0, 120, 0.1)  # 10 rps for 2 minutes
    src = SC.Source(
        exact=pl.DataFrame({"function": ["a"] * t.size, "t": t, "duration_ms": [500.0] * t.size}),
        kind="test",
    )
    s = SC.build(src, SC.ScheduleParams(warmup_s=10.0))
    warm = s.df.filter(pl.col("phase") == "warmup")
    assert warm.height == 5  # L = 10/s * 0.5 s
    assert warm["t"].max() < 5.0
    main = s.df.filter(pl.col("phase") == "main")
    assert main["t"].min() == pytest.approx(10.0)


def test_azure2021_exact_times_and_shards(tmp_path):
    cold, funcs = Y.coldstarts(Y.SynthParams(rows=300, seed=1))
    req = Y.requests(
        Y.SynthParams(rows=300, seed=1), R.with_pool_and_funcid(cold, cold.columns), funcs
    )
    p = tmp_path / "az.csv"
    Y.azure2021(req).write_csv(p)
    s = SC.build_from_paths([p], SC.ScheduleParams())
    az = R.read_azure2021(p)
    assert s.invocations == az.height
    assert np.allclose(
        np.sort(s.df["trace_t"].to_numpy()), np.sort(az["start_timestamp"].to_numpy())
    )
    parts = SC.shard(s, 3, by="function")
    assert sum(x.invocations for x in parts) == s.invocations
    sets = [set(x.df["function"].to_list()) for x in parts]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2])
    tparts = SC.shard(s, 4, by="time")
    assert sum(x.invocations for x in tparts) == s.invocations
    assert tparts[0].df["t"].max() <= tparts[1].df["t"].min()


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="spread"):
        SC.ScheduleParams(spread="poisson").validate()
    with pytest.raises(ValueError, match="speed"):
        SC.ScheduleParams(speed=0).validate()
