"""One call for the platform demo: a short trace replay against a live gateway, then the
cold-start report of that run (Hearth's own export + the replay's records).

    from hearth.functions.replay.demo import demo_replay
    summary = demo_replay("http://127.0.0.1:8080", function="replay-workload",
                          out="out/demo/replay", coldstarts="out/demo/coldstarts.csv")
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

from pathlib import Path

import polars as pl

from . import analyze, driver, schedule, synth


def demo_schedule(
    rate: float = 20.0, seconds: float = 10.0, seed: int = 0, max_duration_ms: float = 200.0
) -> schedule.Schedule:
    """A small schedule from a synthetic Azure-2021-style trace, sampled to ~``rate``/s."""
    # a busy little region: ~20 cold starts/s, ~7 requests per pod -> ~140 requests/s to sample from
    p = synth.SynthParams(
        rows=3000, seed=seed, functions=60, requests_per_pod_mean=6.0, gap_mean=0.05, gap_sd=0.15
    )
    cold, funcs = synth.coldstarts(p)
    from .readers import with_pool_and_funcid

    req = synth.requests(p, with_pool_and_funcid(cold, cold.columns), funcs)
    az = synth.azure2021(req)
    src = schedule.Source(
        exact=az.select(
            pl.col("func").alias("function"),
            (pl.col("end_timestamp") - pl.col("duration")).alias("t"),
            (pl.col("duration") * 1000).clip(upper_bound=max_duration_ms).alias("duration_ms"),
        ),
        kind="azure2021 (synthetic)",
    )
    start = float(src.exact["t"].quantile(0.25))
    return schedule.build(
        src,
        schedule.ScheduleParams(
            seed=seed,
            target_rps=rate,
            start_s=start - float(src.exact["t"].min()),
            duration_s=seconds,
        ),
    )


def demo_replay(
    base_url: str,
    function: str = "replay-workload",
    out: str | Path = "out/demo/replay",
    coldstarts: str | Path | None = None,
    rate: float = 20.0,
    seconds: float = 10.0,
    seed: int = 0,
) -> dict:
    """Replay a short schedule against ``base_url`` (all invocations to ``function``), write
    records + schedule under ``out``; with Hearth's cold-start export, write the report too."""
    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    sched = demo_schedule(rate, seconds, seed)
    sched.write(outd / "schedule.parquet")
    cfg = driver.DriverConfig(
        target=base_url, function=function, progress=False, max_lag_ms=1000.0, max_failure_rate=0.5
    )
    res = driver.replay(sched.df, cfg)
    rec_path = driver.write_records(res.records, outd / "records.csv")
    summary = {"replay": res.summary, "records": str(rec_path)}
    if coldstarts is not None and Path(coldstarts).exists():
        doc = analyze.run([[coldstarts, rec_path]], outd / "report", labels=["hearth demo"])
        t = doc["traces"][0]
        summary["report"] = str(outd / "report" / "report.html")
        summary["cold_agreement"] = t.get("replay_cold_agreement")
    return summary
