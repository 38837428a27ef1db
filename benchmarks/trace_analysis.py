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

Prints both times and the ratios; last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from glob import glob
from pathlib import Path


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500k rows instead of 2M")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--data", type=Path, default=None, help="reuse/generate the CSVs here")
    ap.add_argument("--out", type=Path, default=None, help="report directory")
    a = ap.parse_args()
    rows = a.rows or (500_000 if a.quick else 2_000_000)

    from hearth.functions.replay import analyze as A
    from hearth.functions.replay import readers as R
    from hearth.functions.replay import synth as Y

    tmp = tempfile.TemporaryDirectory(prefix="hearth-trace-bench-")
    data = a.data or Path(tmp.name) / "data"
    out = a.out or Path(tmp.name) / "report"
    cs_dir = data / "cold_start" / "R1"
    if not cs_dir.is_dir() or len(list(cs_dir.glob("day*.csv"))) != 31:
        t = time.perf_counter()
        cold, _ = Y.coldstarts(Y.SynthParams(rows=rows, seed=0, span_days=31))
        cold = cold.drop("region")
        cs_dir.mkdir(parents=True, exist_ok=True)
        meta = Y.SynthParams(rows=rows, span_days=31).metadata("huawei-coldstart")
        for day in range(31):
            import polars as pl

            Y.write_frame(cold.filter(pl.col("day") == day), cs_dir / f"day{day:02d}.csv", meta)
        print(
            f"generated {rows:,} rows as 31 daily CSVs in {time.perf_counter() - t:.1f}s",
            file=sys.stderr,
        )
    files = sorted(glob(str(cs_dir / "*.csv")))
    size_mb = sum(Path(f).stat().st_size for f in files) / 1e6

    # pandas, the notebook way
    t = time.perf_counter()
    pd_stats = pandas_core(files)
    t_pandas = time.perf_counter() - t

    # Hearth: read (typed, validated) + core statistics
    t = time.perf_counter()
    cold = R.read_coldstarts(data / "cold_start")
    hs = A.core_statistics(cold)
    t_core = time.perf_counter() - t
    n = cold.height
    del cold

    # Hearth: full analysis with report
    t = time.perf_counter()
    doc = A.run([[data / "cold_start"]], out)
    t_full = time.perf_counter() - t

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
        "max_rel_diff_vs_pandas": diff,
        "figures": len(doc["figures"]),
        "target_speedup": 5.0,
        "target_rows_per_s": 1_000_000,
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
    print(json.dumps(res))
    tmp.cleanup()
    return 0 if diff < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
