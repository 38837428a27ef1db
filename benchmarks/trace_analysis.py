"""Cold-start trace analysis: Hearth (polars) vs the published notebooks' pandas way.

Generates a synthetic cold-start table in the Huawei schema (2,000,000 rows as 31 daily CSVs;
``--quick``: 500,000 rows), then in one run:

* pandas, as demo_cold_start.ipynb does it: ``pd.read_csv`` per daily file, ``pd.concat``,
  poolName via ``str.split('-').str[:3].str.join('-')``, funcID, then groupby/quantile/mean for
  the core statistics (per region, cluster and pool: count, mean, p50/p90/p99, component means;
  overall shares and distinct functions);
* Hearth: ``readers.read_coldstarts`` (typed, validated) + ``analyze.core_statistics`` -- the
  same numbers (checked equal);
* Hearth's full analysis (all statistics, fits, 9+ figures, HTML report) from the files.

Nothing is cached between the three: each reads the CSVs itself (the OS page cache is warm for
all three, since the files were just written or read). ``--data DIR`` keeps the generated CSVs
for later runs; they are reused only if a manifest written next to them matches the requested
rows and seed and every file's size and mtime, otherwise they are generated again.
``--repeat N`` (default 3) runs the three N times, interleaved, and reports medians (the
machine is shared).

Prints the times, the ratios and the full analysis' stage timings; the last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

MANIFEST = "bench-manifest.json"


def pandas_core(files: list[str]) -> dict:
    import pandas as pd

    dfs = [pd.read_csv(f) for f in files]
    df = pd.concat(dfs)
    df["region"] = "R1"
    df["poolName"] = df["podID"].str.split("-").str[:3].str.join("-")
    df["funcID"] = (
        df["funcName"].astype(str) + "---" + df["userID"].astype(str) + "---" + df["poolName"]
    )
    comps = ["podAllocationCost", "deployCodeCost", "deployDependencyCost", "schedulingCost"]
    tot = "totalCost_cold_start"
    out = {
        "overall": {
            "count": len(df),
            "mean": df[tot].mean(),
            "sd": df[tot].std(),
            **{f"p{int(q * 100)}": df[tot].quantile(q) for q in (0.5, 0.9, 0.99)},
            **{f"share_{c}": df[c].sum() / df[tot].sum() for c in comps},
            "functions": df["funcID"].nunique(),
        }
    }
    for name, key in (("region", "region"), ("cluster", "clusterName"), ("pool", "poolName")):
        g = df.groupby(key)
        q = g[tot].quantile([0.5, 0.9, 0.99]).unstack()
        m = g[comps].mean()
        res = {}
        for k in g.size().index:
            res[str(k)] = {
                "count": int(g.size()[k]),
                "mean": float(g[tot].mean()[k]),
                "p50": float(q.loc[k, 0.5]),
                "p90": float(q.loc[k, 0.9]),
                "p99": float(q.loc[k, 0.99]),
                **{f"mean_{c}": float(m.loc[k, c]) for c in comps},
            }
        out[f"by_{name}"] = res
    return out


def compare(a: dict, b: dict) -> float:
    """Max relative difference over the shared numeric leaves."""
    worst = 0.0
    for k, v in a.items():
        if k not in b:
            continue
        if isinstance(v, dict):
            worst = max(worst, compare(v, b[k]))
        elif isinstance(v, (int, float)) and isinstance(b[k], (int, float)):
            d = abs(float(v) - float(b[k])) / max(abs(float(v)), 1e-12)
            worst = max(worst, d)
    return worst


def _manifest(cs_dir: Path, rows: int, seed: int) -> dict:
    files = sorted(cs_dir.glob("day*.csv"))
    return {
        "rows": rows,
        "seed": seed,
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


def ensure_data(data: Path, rows: int, seed: int = 0) -> Path:
    """The 31 daily CSVs under ``data``: reused only when the manifest matches the request
    (rows, seed) and every file's size and mtime; generated otherwise."""
    import polars as pl
    from hearth.functions.replay import synth as Y

    cs_dir = data / "cold_start" / "R1"
    man = data / MANIFEST
    if cs_dir.is_dir() and man.exists():
        try:
            old = json.loads(man.read_text())
        except ValueError:
            old = None
        cur = _manifest(cs_dir, rows, seed)
        if old == cur and len(cur["files"]) == 31:
            return cs_dir
    t = time.perf_counter()
    if cs_dir.is_dir():
        for f in cs_dir.iterdir():
            if f.is_file():
                f.unlink()
    cold, _ = Y.coldstarts(Y.SynthParams(rows=rows, seed=seed, span_days=31))
    cold = cold.drop("region")
    cs_dir.mkdir(parents=True, exist_ok=True)
    meta = Y.SynthParams(rows=rows, seed=seed, span_days=31).metadata("huawei-coldstart")
    for day in range(31):
        Y.write_frame(cold.filter(pl.col("day") == day), cs_dir / f"day{day:02d}.csv", meta)
    man.write_text(json.dumps(_manifest(cs_dir, rows, seed)))
    print(
        f"generated {rows:,} rows as 31 daily CSVs in {time.perf_counter() - t:.1f}s",
        file=sys.stderr,
    )
    return cs_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500k rows instead of 2M")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--data", type=Path, default=None, help="reuse/generate the CSVs here")
    ap.add_argument("--out", type=Path, default=None, help="report directory")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved (medians)")
    a = ap.parse_args()
    rows = a.rows or (500_000 if a.quick else 2_000_000)

    from hearth.functions.replay import analyze as A
    from hearth.functions.replay import readers as R

    tmp = tempfile.TemporaryDirectory(prefix="hearth-trace-bench-")
    data = a.data or Path(tmp.name) / "data"
    out = a.out or Path(tmp.name) / "report"
    cs_dir = ensure_data(data, rows)
    files = sorted(glob(str(cs_dir / "*.csv")))
    size_mb = sum(Path(f).stat().st_size for f in files) / 1e6

    runs: dict[str, list[float]] = {"pandas": [], "core": [], "full": []}
    load = [os.getloadavg()[0]]
    for _ in range(max(1, a.repeat)):
        # pandas, the notebook way
        t = time.perf_counter()
        pd_stats = pandas_core(files)
        runs["pandas"].append(time.perf_counter() - t)

        # Hearth: read (typed, validated) + core statistics
        t = time.perf_counter()
        cold = R.read_coldstarts(data / "cold_start")
        hs = A.core_statistics(cold)
        runs["core"].append(time.perf_counter() - t)
        n = cold.height
        del cold

        # Hearth: full analysis with report, from the files again (nothing is reused)
        t = time.perf_counter()
        doc = A.run([[data / "cold_start"]], out)
        runs["full"].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])

    t_pandas, t_core, t_full = (statistics.median(runs[k]) for k in ("pandas", "core", "full"))
    diff = compare(pd_stats, hs)
    res = {
        "benchmark": "trace_analysis",
        "rows": n,
        "files": len(files),
        "csv_mb": round(size_mb, 1),
        "pandas_core_s": round(t_pandas, 3),
        "hearth_core_s": round(t_core, 3),
        "hearth_full_report_s": round(t_full, 3),
        "speedup_core": round(t_pandas / t_core, 2),
        "speedup_full_vs_pandas_core": round(t_pandas / t_full, 2),
        "hearth_core_rows_per_s": round(n / t_core),
        "hearth_full_rows_per_s": round(n / t_full),
        "max_rel_diff_vs_pandas": diff,
        "figures": len(doc["figures"]),
        "target_speedup": 5.0,
        "target_rows_per_s": 1_000_000,
        "repeat": len(runs["full"]),
        "runs_s": {k: [round(v, 3) for v in vs] for k, vs in runs.items()},
        "full_stages_s": doc["timings_s"],
        "loadavg_1min": [round(v, 2) for v in load],
    }
    print(f"rows {n:,} in {len(files)} daily CSVs ({size_mb:.0f} MB)")
    print(f"pandas (notebook way) read + core stats: {t_pandas:8.2f} s")
    print(
        f"hearth read + core stats:                {t_core:8.2f} s  ({n / t_core / 1e6:.2f} M rows/s, {t_pandas / t_core:.1f}x)"
    )
    print(
        f"hearth full analysis + report:           {t_full:8.2f} s  ({t_pandas / t_full:.1f}x vs pandas core only)"
    )
    print(f"max relative difference of the core statistics vs pandas: {diff:.2e}")
    print(f"full analysis stages (s): {json.dumps(doc['timings_s'])}")
    print(f"load average (1 min) before/after each run: {res['loadavg_1min']}")
    print(json.dumps(res))
    tmp.cleanup()
    return 0 if diff < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
