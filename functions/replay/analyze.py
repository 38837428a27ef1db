"""Cold-start trace analysis after the Huawei paper: statistics (JSON), figures (PNG), HTML report.

Reads public Huawei cold-start tables and Hearth's own exports alike (same columns), optionally
with the runtime/trigger table (CDFs per runtime and trigger) and per-request rows (per-function
cold-start rate, pod utility ratio). Several traces can be put side by side (``compare``).

How the work is shared (2 M rows in 31 daily CSVs: read, statistics, 9 figures and the report
in about 1.5 s on the shared 2-core machine when it is not busy; see docs/traces.md):

* the cold-start times are sorted once (a single-threaded polars argsort, in a thread); every
  quantile (overall and per group), every CDF curve and the LogNormal KS distance are read off
  that order, exactly, on the whole table. A stable radix sort of a key's codes in that order
  gives each group's sorted values;
* each key column (region, cluster, pool, function, runtime, trigger) is hashed once into
  integer codes (:class:`Columns`); counts and means per group, per function, per hour and per
  time bucket are ``np.bincount`` over those codes;
* the independent parts (sort, fits, gaps, Spearman ranks, core statistics) run in threads
  beside each other; sorts and ranks use one thread each, since the parts already keep both
  cores busy and a parallel sort beside them costs more CPU than it saves;
* only two things use a seeded sample (recorded in the JSON): the Weibull MLE of the gaps
  between cold starts (at most ``FIT_SAMPLE`` gaps; its KS distances are computed on all gaps)
  and the per-row Spearman matrix (at most ``SPEARMAN_ROWS`` rows);
* figures are drawn from numpy arrays only (CDFs: ``CDF_POINTS`` exact quantile points per
  curve). When a core is idle, a forked process draws about half of them.

This module is the driver (:func:`analyze_trace`, :func:`run`); the parts live beside it, one
job each: ``coldstart_trace`` (what is read and what comes out), ``trace_columns`` (key
columns as integer codes, bincount aggregations), ``trace_stats`` (statistics read off the one
sort), ``fits`` (LogNormal, Weibull, KS), ``correlations`` (Spearman), ``per_request``
(per-function rates, pod utility, cold-flag agreement), ``figures`` (one function per figure),
``figure_runner`` (drawing them, with a forked helper) and ``report`` (the HTML page). The
names that other code imported from here before the split are still importable from here.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import contextlib
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl

from . import readers as R
from .coldstart_trace import Analysis, AnalysisError, Trace, load_trace
from .correlations import (
    SPEARMAN_ROWS,
    average_ranks,
    correlations,
    correlations_from,
    row_spearman,
)
from .figure_runner import figure_workers, figures
from .figures import CDF_TITLES, figure_jobs, pyplot
from .fits import (
    FIT_SAMPLE,
    KS_BLOCK,
    fit_lognormal,
    fit_weibull,
    interarrival_gaps,
    ks_distance,
    weibull_mle,
)
from .per_request import (
    cold_agreement,
    per_function_rates,
    per_request_stats,
    same_clock,
    utility_ratios,
)
from .report import render_html
from .threads import InThread
from .trace_columns import (
    COMP,
    MISSING,
    Columns,
    Groups,
    T,
    coarser,
    group_codes,
    per_function_frame,
    per_hour_frames,
)
from .trace_stats import (
    CDF_POINTS,
    GROUP_KEYS,
    MAX_GROUPS,
    QNAMES,
    QUANTILES,
    SortedTotals,
    cdf_points,
    core_from,
    core_statistics,
    group_cdfs,
    json_safe,
    peak_to_trough,
    peak_to_trough_from,
    quantiles_sorted,
    sort_order,
    sorted_values,
)

__all__ = [  # the analysis' public names, as imported from this module before it was split
    "CDF_POINTS",
    "CDF_TITLES",
    "COMP",
    "FIT_SAMPLE",
    "GROUP_KEYS",
    "KS_BLOCK",
    "MAX_GROUPS",
    "MISSING",
    "QNAMES",
    "QUANTILES",
    "SPEARMAN_ROWS",
    "T",
    "Analysis",
    "AnalysisError",
    "Columns",
    "Groups",
    "SortedTotals",
    "Trace",
    "analyze_trace",
    "average_ranks",
    "cdf_points",
    "cold_agreement",
    "core_statistics",
    "correlations",
    "figure_jobs",
    "figures",
    "fit_lognormal",
    "fit_weibull",
    "group_cdfs",
    "group_codes",
    "interarrival_gaps",
    "ks_distance",
    "load_trace",
    "peak_to_trough",
    "per_function_rates",
    "quantiles_sorted",
    "render_html",
    "run",
    "same_clock",
    "sort_order",
    "sorted_values",
    "utility_ratios",
    "weibull_mle",
]


class _Clock:
    """Wall seconds per stage of an analysis (``run`` reports them as ``timings_s``)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 4)
        self.t = now


def _time_bucket(span: float) -> float:
    """The coarsest of day/hour/10 min/min/10 s/s giving at least 12 bins."""
    return next((b for b in (86400.0, 3600.0, 600.0, 60.0, 10.0) if span / b >= 12), 1.0)


def _weibull_part(cold: pl.DataFrame, seed: int) -> tuple[dict, tuple | None]:
    """The gaps between cold starts, their Weibull fit and CDF curve (runs in a thread). The
    gaps are computed eagerly: polars then sees the sorted flags of time and region (the
    files are usually in time order) and skips most of the sort."""
    gaps = interarrival_gaps(cold)
    if gaps.size < 10 or np.ptp(np.log(gaps)) <= 1e-9:
        return {"error": "fewer than 10 distinct gaps between cold starts"}, None
    gs = sorted_values(gaps)
    try:
        return fit_weibull(gs, seed, presorted=True), cdf_points(gs)
    except ValueError as e:  # no sign change: degenerate gaps
        return {"error": f"Weibull fit failed: {e}"}, None


def _lognormal_part(sorting) -> tuple[dict, tuple | None]:
    """LogNormal fit of the positive cold-start times and the CDF curve of all of them, once
    they are sorted (runs in a thread)."""
    srt = sorting.result()
    pos = srt.sorted[np.searchsorted(srt.sorted, 0.0, side="right") :]
    pos = pos[np.isfinite(pos)] if pos.size and not np.isfinite(pos[-1]) else pos
    if pos.size >= 3 and np.log(pos[-1]) - np.log(pos[0]) > 1e-9:
        return fit_lognormal(pos, presorted=True), cdf_points(srt.sorted)
    return {"error": "too few distinct positive cold-start times to fit"}, None


def _grouped_core(sorting, cols: Columns) -> tuple[dict, dict]:
    """Each group key's values in (group, value) order, and the core statistics read off
    them (runs in a thread, beside the rest of the analysis)."""
    srt = sorting.result()
    grouped = {n: srt.by_group(cols.groups[n].codes, cols.groups[n].k) for n in GROUP_KEYS}
    return grouped, core_from(cols, srt, grouped)


def _with_runtime(cold: pl.DataFrame, runtime: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """The cold starts with each function's runtime and trigger (from the runtime table; a
    function missing there gets a label saying so), and how well the two tables matched."""
    rt = runtime.select(
        "funcID", "runtime", "trigger", "invocation", "triggerType-invocationType"
    ).unique("funcID")
    cold = cold.join(rt, on="funcID", how="left", maintain_order="left").with_columns(
        pl.col("runtime").fill_null("(not in runtime table)"),
        pl.col("trigger").fill_null("(not in runtime table)"),
    )
    return cold, {
        "functions": runtime.height,
        "matched_coldstarts": int(cold["invocation"].is_not_null().sum()),
        "multi_trigger_functions": int((runtime["n_triggers"] > 1).sum()),
    }


def _components(cols: Columns, rows: int, hours: tuple, bucket: float) -> tuple[dict, tuple]:
    """The four cold-start components: their shares of the total time, the mean share per cold
    start, mean seconds; and their means per time bucket (the figure's curve)."""
    if bucket >= 3600 and bucket % 3600 == 0:  # days from the hours already summed
        b, ct = coarser(hours[1], hours[2], int(bucket // 3600))
    else:
        _, b, ct = cols.per_time(bucket, by_region=False)
    curve = (bucket, {"bucket": b.astype(float), **{c: ct[c] for c in COMP}})
    sums = [float(cols.comp[c].sum()) for c in COMP] + [float(cols.x.sum())]
    row_share: list = [None] * len(COMP)
    if cols.n:
        buf = np.empty_like(cols.x)  # one buffer for the four ratios
        with np.errstate(invalid="ignore", divide="ignore"):
            row_share = [float(np.divide(cols.comp[c], cols.x, out=buf).mean()) for c in COMP]
    stats = {
        "share_of_total_time": {
            c: json_safe(sums[i] / sums[-1]) if sums[-1] else None for i, c in enumerate(COMP)
        },
        "mean_share_per_coldstart": {c: json_safe(row_share[i]) for i, c in enumerate(COMP)},
        "mean_seconds": {c: json_safe(sums[i] / max(rows, 1)) for i, c in enumerate(COMP)},
        "bucket_s": bucket,
    }
    return stats, curve


def origin_of(from_pool: pl.Expr) -> pl.Expr:
    """Hearth's ``fromPool`` column (``true``/``false`` as written, or a boolean) as a start's
    origin: a warm-pool instance specialised, or a new instance (a fork of a zygote or a new
    process); a value that is neither says so."""
    v = from_pool.cast(pl.String).str.to_lowercase()
    return (
        pl.when(v == "true")
        .then(pl.lit("warm pool"))
        .when(v == "false")
        .then(pl.lit("new instance"))
        .otherwise(pl.lit("(unknown)"))
    )


def analyze_trace(tr: Trace, seed: int = 0) -> Analysis:
    """Every statistic of one trace (``Analysis.stats``) and the arrays its figures are drawn
    from (``Analysis.curves``). The independent parts run in threads (numpy and polars release
    the GIL); all of them are joined on return, so the caller may fork."""
    clock = _Clock()
    cold = tr.cold.filter(pl.col(T).is_not_null()) if tr.cold[T].null_count() else tr.cold
    st: dict = {"label": tr.label, "files": tr.files, "skipped_files": tr.skipped}
    curves: dict = {}
    x = cold[T].cast(pl.Float64).to_numpy()
    sorting = InThread(SortedTotals, x)  # the one sort, beside polars
    lognormal = InThread(_lognormal_part, sorting)  # the fit on the sorted values, likewise
    row_corr = InThread(row_spearman, cold, seed)  # ranks of the row sample, likewise

    groups = dict(GROUP_KEYS)
    if "fromPool" in cold.columns:  # Hearth's own log: where each start came from
        cold = cold.with_columns(origin_of(pl.col("fromPool")).alias("origin"))
        groups |= {"origin": "origin"}
    if tr.runtime is not None:
        cold, st["runtime_table"] = _with_runtime(cold, tr.runtime)
        groups |= {"runtime": "runtime", "trigger": "trigger"}

    span = float(cold["time"].max() - cold["time"].min()) if cold.height else 0.0
    bucket = _time_bucket(span)
    weibull = InThread(_weibull_part, cold, seed)  # gaps, fit and KS beside the rest
    clock.lap("gaps")
    cols = Columns(cold, groups, x)
    second = InThread(_grouped_core, sorting, cols)  # per-group order and core statistics
    clock.lap("group_codes")
    st["identity"] = R.check_identity(cold).to_dict()
    clock.lap("identity")
    hours = cols.per_time(3600.0)
    per_hour, hourly = per_hour_frames(cols, hours)
    st["spearman"] = correlations_from(row_corr.result(), per_function_frame(cols), per_hour)
    clock.lap("spearman")
    st["peak_to_trough"] = peak_to_trough_from(hourly)
    curves["hourly"] = {
        str(r): (p["h"].to_numpy(), p["len"].to_numpy())
        for (r,), p in hourly.partition_by("region", as_dict=True, maintain_order=True).items()
    }
    st["components"], curves["components_time"] = _components(cols, cold.height, hours, bucket)
    clock.lap("components_hourly")
    st["fit_interarrival_weibull"], gap_curve = weibull.result()
    if gap_curve is not None:
        curves["gaps"] = gap_curve
    clock.lap("weibull_wait")

    if tr.requests is not None and tr.requests.height:
        part, part_curves = per_request_stats(cold, tr.requests)
        st |= part
        curves |= part_curves
    clock.lap("per_request")
    srt = sorting.result()
    grouped, st["core"] = second.result()
    clock.lap("core_wait")
    codes = cols.groups
    st["fit_coldstart_lognormal"], total_curve = lognormal.result()
    if total_curve is not None:
        curves["total"] = total_curve
    clock.lap("lognormal_wait")
    st["cdf"] = {}
    curves["cdf"] = {}
    for name in groups:
        c = group_cdfs(srt, codes[name], grouped.get(name))
        curves["cdf"][name] = c
        st["cdf"][name] = {
            g: {"n": v["n"], "median": v["median"], "p99": v["p99"]} for g, v in c.items()
        }
    clock.lap("cdf")
    order = ["label", "files", "skipped_files", "core", "identity", "fit_coldstart_lognormal"]
    order += ["fit_interarrival_weibull", "runtime_table", "cdf", "components", "spearman"]
    stats_ = {k: st[k] for k in order if k in st} | {k: v for k, v in st.items() if k not in order}
    return Analysis(tr.label, json_safe(stats_), curves, clock.laps)


def run(
    groups: list[list[str | Path]], out: str | Path, seed: int = 0, labels: list[str] | None = None
) -> dict:
    """Analyse each group of paths as one trace; write stats.json, PNGs and report.html.
    Everything is read and computed from the files on every call (nothing is cached)."""
    if not groups:
        raise AnalysisError("no trace given")
    with _gc_paused():
        return _run(groups, Path(out), seed, labels)


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off for one analysis: refcounting frees nearly all of
    its objects, while each full collection walks every object the imported libraries hold
    (matplotlib's figures trigger several): about 0.2 CPU-s per run on 2 M rows."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _run(groups: list[list[str | Path]], outd: Path, seed: int, labels: list[str] | None) -> dict:
    outd.mkdir(parents=True, exist_ok=True)
    importing = InThread(pyplot)  # matplotlib loads while polars reads the files
    analyses = []
    timings: dict = {}
    for i, g in enumerate(groups):
        t = time.perf_counter()
        tr = load_trace(g, labels[i] if labels else None)
        timings[f"read_{i}"] = round(time.perf_counter() - t, 4)
        analyses.append(analyze_trace(tr, seed))
        timings[f"analyze_{i}"] = analyses[-1].timings
        del tr  # the tables are not needed for the figures: less for the figure fork to copy
    t = time.perf_counter()
    importing.result()
    timings["matplotlib_import_wait"] = round(time.perf_counter() - t, 4)
    workers = figure_workers() if hasattr(os, "fork") else 1
    figs = figures(analyses, outd, workers)
    timings["figures"] = round(time.perf_counter() - t, 4)
    timings["figure_processes"] = min(workers, 2) if len(figure_jobs(analyses)) > 1 else 1
    doc = {"traces": [a.stats for a in analyses], "figures": [f for f, _ in figs]}
    (outd / "stats.json").write_text(json.dumps(json_safe(doc), indent=1, default=str) + "\n")
    (outd / "report.html").write_text(render_html(analyses, figs))
    doc["timings_s"] = timings  # not in stats.json: timings are not statistics
    return doc
