"""Statistics that join the cold-start table with per-request rows: per-function cold-start
rates, pod utility ratios, and whether a replay's cold flags agree with the cold-start records."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
import polars as pl

from .correlations import spearman
from .trace_columns import T
from .trace_stats import cdf_points, json_safe


def _func_key(cold: pl.DataFrame, req: pl.DataFrame) -> pl.Expr:
    """funcID, or funcName---userID when the pools differ between the two tables (Hearth's
    replay records carry instance ids, not Huawei-style pod ids, so no pool can be derived)."""
    fc, fr = set(cold["funcID"].unique().to_list()), set(req["funcID"].unique().to_list())
    if fr and len(fc & fr) >= 0.5 * len(fr):
        return pl.col("funcID")
    return pl.concat_str([pl.col("funcName"), pl.col("userID")], separator="---")


def _pod_key(cold: pl.DataFrame, req: pl.DataFrame) -> str:
    """The cold-start column naming the same instances as the per-request ``podID``: podID in the
    public traces, requestID in Hearth's export (its podID is a Huawei-style counter)."""
    seen = set(req["podID"].drop_nulls().unique().to_list())
    best = max(
        (c for c in ("podID", "requestID") if c in cold.columns),
        key=lambda c: len(set(cold[c].cast(pl.String).to_list()) & seen),
    )
    return best


def per_function_rates(cold: pl.DataFrame, req: pl.DataFrame) -> pl.DataFrame:
    key = _func_key(cold, req)
    r = req.group_by(key.alias("funcID")).agg(pl.len().alias("requests"))
    c = cold.group_by(key.alias("funcID")).agg(pl.len().alias("coldstarts"))
    return (
        r.join(c, on="funcID", how="full", coalesce=True)
        .with_columns(pl.col("requests").fill_null(0), pl.col("coldstarts").fill_null(0))
        .with_columns((pl.col("coldstarts") / pl.col("requests")).alias("coldstart_rate"))
    )


def same_clock(cold: pl.DataFrame, req: pl.DataFrame) -> bool:
    """Both tables on one time axis? (Hearth's export counts from its first cold start, the
    replay records use epoch seconds; the public tables share the trace's own axis.)"""
    a, b = cold["time"].median(), req["time_worker"].median()
    return a is not None and b is not None and abs(float(a) - float(b)) < 40 * 86400


def utility_ratios(cold: pl.DataFrame, req: pl.DataFrame) -> pl.DataFrame:
    """Pod utility ratio = (pod lifetime - keep-alive) / cold-start time.

    Approximation (the traces have no pod-end events): lifetime - keep-alive is estimated as
    (last request end seen on the pod) - (pod's cold start time + cold-start duration), i.e. the
    time the pod was ready and serving before its keep-alive window began (``time`` in the
    cold-start table is taken as the start of the cold start). Pods whose cold start is not
    in the cold-start table are left out; pods alive at the window end are right-censored."""
    last = req.group_by("podID").agg(
        (pl.col("time_worker") + pl.col("totalCost_worker").fill_null(0)).max().alias("last_seen"),
        pl.len().alias("requests"),
    )
    pk = _pod_key(cold, req)
    return (
        cold.select(pl.col(pk).cast(pl.String).alias("podID"), "time", T, "funcID")
        .join(last, on="podID", how="inner")
        .with_columns(
            (
                (pl.col("last_seen") - pl.col("time") - pl.col(T)).clip(lower_bound=0) / pl.col(T)
            ).alias("utility")
        )
        .filter(pl.col(T) > 0)
    )


def cold_agreement(records: pl.DataFrame, cold: pl.DataFrame) -> dict:
    """Do the replay's cold/warm flags (``X-Hearth-Cold``) agree with the platform's own
    cold-start records? They agree when every instance with an invocation flagged cold has a
    cold-start record. Reported, not counted as disagreement: recorded instances the replay
    reached with no invocation flagged cold (started ahead of demand: scale-out, pre-warm,
    the first invocation arrived after the start finished), and several cold-flagged
    invocations on one instance (a flag marks an invocation that caused a start, and with
    concurrency > 1 one that caused a second start may be served by the first new instance).

    The instance id is matched against ``podID`` or, for Hearth's export (where ``podID`` is a
    Huawei-style counter and ``requestID`` holds the instance id), ``requestID``: whichever
    overlaps the replay's instance ids more."""
    inst_col = "instance" if "instance" in records.columns else "podID"
    r = records.filter(pl.col("cold").is_not_null() & pl.col(inst_col).is_not_null())
    seen = set(r[inst_col].unique().to_list())
    keys = {
        c: set(cold[c].cast(pl.String).to_list())
        for c in ("podID", "requestID")
        if c in cold.columns
    }
    key = max(keys, key=lambda c: len(keys[c] & seen)) if keys else "podID"
    recorded = keys.get(key, set())
    flagged = r.filter(pl.col("cold"))
    flagged_inst = set(flagged[inst_col].to_list())
    per_inst = flagged.group_by(inst_col).len()
    missing_record = flagged_inst - recorded
    missing_flag = (recorded & seen) - flagged_inst
    return {
        "matched_on": key,
        "invocations_with_flag": r.height,
        "flagged_cold": flagged.height,
        "instances_flagged_cold": len(flagged_inst),
        "instances_flagged_without_record": len(missing_record),
        "recorded_instances_seen_by_replay": len(recorded & seen),
        "recorded_instances_reached_warm": len(missing_flag),
        "instances_with_several_cold_flags": int((per_inst["len"] > 1).sum()),
        "agree": bool(flagged.height > 0 and not missing_record),
    }


def per_request_stats(cold: pl.DataFrame, req: pl.DataFrame) -> tuple[dict, dict]:
    """The analysis' per-request part: per-function cold-start rates, the replay's cold-flag
    agreement (records written by the replay driver), pod utility; and their figures' curves."""
    stats: dict = {}
    curves: dict = {}
    pf = per_function_rates(cold, req)
    rates = pf.filter(pl.col("requests") > 0)["coldstart_rate"].to_numpy()
    both = pf.filter((pl.col("requests") > 0) & (pl.col("coldstarts") > 0))
    curves["per_function"] = {
        "requests": both["requests"].to_numpy(),
        "coldstarts": both["coldstarts"].to_numpy(),
    }
    stats["per_function"] = {
        "functions_with_requests": int((pf["requests"] > 0).sum()),
        "functions_with_coldstarts": int((pf["coldstarts"] > 0).sum()),
        "coldstart_rate_median": json_safe(np.median(rates)) if rates.size else None,
        "coldstart_rate_p90": json_safe(np.quantile(rates, 0.9)) if rates.size else None,
        "overall_coldstart_rate": json_safe(pf["coldstarts"].sum() / max(pf["requests"].sum(), 1)),
        "spearman_requests_vs_coldstarts": json_safe(
            spearman(both.select("requests", "coldstarts"))["requests"]["coldstarts"]
        )
        if both.height > 2
        else None,
    }
    if "cold" in req.columns:  # records written by the replay driver
        stats["replay_cold_agreement"] = cold_agreement(req, cold)
    if same_clock(cold, req):
        u = utility_ratios(cold, req)["utility"].to_numpy()
        curves["utility"] = cdf_points(np.sort(u))
        why = None
    else:
        u = np.array([])
        why = "cold-start and per-request times are on different clocks (e.g. Hearth's export is relative)"
    stats["pod_utility"] = {
        "skipped": why,
        "pods": int(u.size),
        "fraction_below_1": json_safe((u < 1).mean()) if u.size else None,
        "median": json_safe(np.median(u)) if u.size else None,
        "approximation": "utility = (last request end on pod - (cold-start time + cold-start duration)) / "
        "cold-start duration; "
        "keep-alive excluded; pods without requests in the per-request rows are left out",
    }
    return stats, curves
