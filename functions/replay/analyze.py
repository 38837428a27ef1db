"""Cold-start trace analysis after the Huawei paper: statistics (JSON), figures (PNG), HTML report.

Reads public Huawei cold-start tables and Hearth's own exports alike (same columns), optionally
with the runtime/trigger table (CDFs per runtime and trigger) and per-request rows (per-function
cold-start rate, pod utility ratio). Several traces can be put side by side (``compare``).

Statistics are computed with polars on the whole table; fits use a seeded subsample of at most
``FIT_SAMPLE`` values (the fitted parameters are stable long before that); KS distances are
computed on the same sample.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import optimize, special, stats

from . import readers as R
from . import schemas as S
from .synth import PUBLISHED, lognormal_moments, lognormal_params, weibull_moments, weibull_params

FIT_SAMPLE = 400_000
CDF_POINTS = 400
MAX_GROUPS = 8
T = S.TOTAL
COMP = list(S.COMPONENTS)


@dataclass
class Trace:
    label: str
    cold: pl.DataFrame
    runtime: pl.DataFrame | None = None
    requests: pl.DataFrame | None = None
    skipped: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)


class AnalysisError(ValueError):
    """The inputs cannot be analysed (e.g. no cold-start table among them)."""


def load_trace(paths: list[str | Path], label: str | None = None) -> Trace:
    skipped: list[str] = []
    kinds = R.classify(paths, skipped=skipped)
    if "huawei-coldstart" not in kinds:
        found = ", ".join(sorted(kinds)) or "nothing readable"
        raise AnalysisError(
            f"{', '.join(map(str, paths))}: no cold-start table (Huawei cold-start columns) found; got {found}"
        )
    cold = R.read_coldstarts(kinds["huawei-coldstart"])
    runtime = R.read_runtime(kinds["huawei-runtime"]) if "huawei-runtime" in kinds else None
    req = R.read_requests(kinds["huawei-request"]) if "huawei-request" in kinds else None
    lab = label or ", ".join(Path(p).name or str(p) for p in paths)
    return Trace(lab, cold, runtime, req, skipped, {k: len(v) for k, v in kinds.items()})


# --------------------------------------------------------------------------------------------
# pure statistics


QUANTILES = (0.5, 0.9, 0.99)
NUMPY_GROUPS_MAX = 64


def _group_quantiles(df: pl.DataFrame, key: str, x: np.ndarray) -> dict[str, list[float]]:
    """Linear-interpolated quantiles of ``x`` per ``key`` value with numpy's O(n) selection
    (polars sorts each group per quantile, several times slower for few large groups)."""
    s = df[key].cast(pl.String)
    cats = s.unique().drop_nulls().to_list()
    codes = s.replace_strict(
        cats, list(range(len(cats))), default=-1, return_dtype=pl.Int32
    ).to_numpy()
    out = {}
    for g, name in enumerate(cats):
        xs = x[codes == g]
        if xs.size:
            out[name] = [float(v) for v in np.quantile(xs, QUANTILES)]
    return out


def core_statistics(cold: pl.DataFrame | pl.LazyFrame) -> dict:
    """The notebook's core numbers: counts and cold-start time quantiles per region, cluster and
    pool; component means per region; overall component shares."""
    df = cold.collect() if isinstance(cold, pl.LazyFrame) else cold
    lf = df.lazy()
    qnames = [f"p{int(q * 100)}" for q in QUANTILES]

    def per(key: str, with_q: bool) -> pl.LazyFrame:
        return lf.group_by(key).agg(
            pl.len().alias("count"),
            pl.col(T).mean().alias("mean"),
            *(
                [
                    pl.col(T).quantile(q, "linear").alias(n)
                    for q, n in zip(QUANTILES, qnames, strict=True)
                ]
                if with_q
                else []
            ),
            *[pl.col(c).mean().alias(f"mean_{c}") for c in COMP],
        )

    keys = {"region": "region", "cluster": "clusterName", "pool": "poolName"}
    few = {k: df[c].n_unique() <= NUMPY_GROUPS_MAX for k, c in keys.items()}
    overall = lf.select(
        pl.len().alias("count"),
        pl.col(T).mean().alias("mean"),
        pl.col(T).std().alias("sd"),
        *[(pl.col(c).sum() / pl.col(T).sum()).alias(f"share_{c}") for c in COMP],
        pl.col("funcID").n_unique().alias("functions"),
        pl.col("time").min().alias("t_min"),
        pl.col("time").max().alias("t_max"),
    )
    frames = pl.collect_all([overall, *[per(c, not few[k]) for k, c in keys.items()]])
    x = df[T].to_numpy()
    o = frames[0].to_dicts()[0]
    if x.size:
        o |= dict(zip(qnames, (float(v) for v in np.quantile(x, QUANTILES)), strict=True))
    out = {"overall": _clean(o)}
    for (name, col), f in zip(keys.items(), frames[1:], strict=True):
        gq = _group_quantiles(df, col, x) if few[name] else {}
        rows = {}
        for r in f.sort(col).to_dicts():
            k = str(r.pop(col))
            if k in gq:
                r |= dict(zip(qnames, gq[k], strict=True))
            rows[k] = _clean(r)
        out[f"by_{name}"] = rows
    return out


def _clean(d):
    if isinstance(d, dict):
        return {str(k): _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    if isinstance(d, (float, np.floating)):
        f = float(d)
        return f if math.isfinite(f) else None
    if isinstance(d, np.integer):
        return int(d)
    return d


def _sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if x.size <= n:
        return x
    return x[np.random.default_rng(seed).integers(0, x.size, n)]  # with replacement: O(n)


def ks_distance(sorted_x: np.ndarray, cdf: np.ndarray) -> float:
    """Kolmogorov-Smirnov D of a sorted sample against model CDF values at those points."""
    n = sorted_x.size
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


def _lognorm_cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return special.ndtr((np.log(x) - mu) / sigma)


def _weibull_cdf(x: np.ndarray, k: float, lam: float) -> np.ndarray:
    return -np.expm1(-((x / lam) ** k))


def fit_lognormal(x: np.ndarray) -> dict:
    x = np.sort(x[x > 0])
    lx = np.log(x)
    mu, sigma = float(lx.mean()), float(lx.std(ddof=0))
    mean, sd = lognormal_moments(mu, sigma)
    pmu, psig = lognormal_params(**PUBLISHED["coldstart_lognormal"])
    ks_fit = ks_distance(x, _lognorm_cdf(x, mu, sigma))
    ks_pub = ks_distance(x, _lognorm_cdf(x, pmu, psig))
    return {
        "n": int(x.size),
        "mu": mu,
        "sigma": sigma,
        "mean": mean,
        "sd": sd,
        "empirical_mean": float(x.mean()),
        "empirical_sd": float(x.std()),
        "ks_vs_fit": float(ks_fit),
        "ks_vs_published": float(ks_pub),
        "published": PUBLISHED["coldstart_lognormal"] | {"mu": pmu, "sigma": psig},
    }


def weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Weibull (shape, scale) MLE with location 0, from the profile likelihood equation."""
    lx = np.log(x)
    mlx = lx.mean()
    z = lx - lx.max()  # scale-free: x^k / max^k

    def g(logk: float) -> float:
        k = math.exp(logk)
        w = np.exp(k * z)
        return float((w * lx).sum() / w.sum() - 1.0 / k - mlx)

    k = math.exp(optimize.brentq(g, math.log(0.01), math.log(100.0), xtol=1e-10))
    lam = float(np.exp(mlx + np.log(np.mean(np.exp(k * (lx - mlx)))) / k))
    return k, lam


def interarrival_gaps(cold: pl.DataFrame, resolution: float | None = None) -> np.ndarray:
    """Time between consecutive cold starts within each region. Zero gaps (ties at the trace's
    time resolution) are replaced by half the resolution so the Weibull likelihood is defined."""
    g = (
        cold.select("region", "time")
        .sort(["region", "time"])
        .select(pl.col("time").diff().over("region").alias("g"))
        .drop_nulls()["g"]
        .to_numpy()
    )
    if g.size == 0:
        return g
    if resolution is None:
        pos = g[g > 0]
        resolution = float(pos.min()) if pos.size else 1e-3
    return np.where(g <= 0, resolution / 2, g)


def fit_weibull(gaps: np.ndarray) -> dict:
    gaps = np.sort(gaps)
    k, lam = weibull_mle(gaps)
    mean, sd = weibull_moments(k, lam)
    pk, plam = weibull_params(**PUBLISHED["interarrival_weibull"])
    return {
        "n": int(gaps.size),
        "shape": k,
        "scale": lam,
        "mean": mean,
        "sd": sd,
        "empirical_mean": float(gaps.mean()),
        "empirical_sd": float(gaps.std()),
        "ks_vs_fit": ks_distance(gaps, _weibull_cdf(gaps, k, lam)),
        "ks_vs_published": ks_distance(gaps, _weibull_cdf(gaps, pk, plam)),
        "published": PUBLISHED["interarrival_weibull"] | {"shape": pk, "scale": plam},
    }


def _spearman(df: pl.DataFrame) -> dict:
    ranks = df.select([pl.col(c).rank("average") for c in df.columns]).to_numpy()
    if ranks.shape[0] < 3:
        return {}
    with np.errstate(invalid="ignore", divide="ignore"):  # constant columns -> NaN -> null
        m = np.corrcoef(ranks, rowvar=False)
    cols = df.columns
    return {a: {b: _clean(m[i, j]) for j, b in enumerate(cols)} for i, a in enumerate(cols)}


def correlations(cold: pl.DataFrame, seed: int = 0, sample: pl.DataFrame | None = None) -> dict:
    rows = (sample if sample is not None else cold).select([T, *COMP])
    if rows.height > FIT_SAMPLE:
        rows = rows.sample(FIT_SAMPLE, seed=seed)
    per_func = cold.group_by("funcID").agg(
        pl.len().alias("coldstarts"), pl.col(T).mean(), *[pl.col(c).mean() for c in COMP]
    )
    hourly = (
        cold.with_columns((pl.col("time") // 3600).alias("hour"))
        .group_by("region", "hour")
        .agg(pl.len().alias("coldstarts"), pl.col(T).mean(), *[pl.col(c).mean() for c in COMP])
        .drop("region", "hour")
    )
    return {
        "rows": _spearman(rows),
        "per_function": _spearman(per_func.drop("funcID")),
        "per_hour": _spearman(hourly),
    }


def peak_to_trough(cold: pl.DataFrame) -> dict:
    """Peak/trough of cold starts per hour (complete hours only) and of the mean hour-of-day
    profile, per region."""
    out = {}
    for (region,), part in cold.partition_by("region", as_dict=True, maintain_order=True).items():
        h = (
            part.select((pl.col("time") // 3600).cast(pl.Int64).alias("h"))
            .group_by("h")
            .len()
            .sort("h")
        )
        if h.height > 2:
            h = h.slice(1, h.height - 2)  # drop partial first/last hour
        counts = h["len"].to_numpy()
        prof = (
            h.with_columns((pl.col("h") % 24).alias("hod"))
            .group_by("hod")
            .agg(pl.col("len").mean())
            .sort("hod")
        )
        pmax, pmin = (
            (float(prof["len"].max()), float(prof["len"].min())) if prof.height else (0.0, 0.0)
        )
        out[str(region)] = {
            "hours": int(counts.size),
            "peak_per_hour": float(counts.max()) if counts.size else None,
            "trough_per_hour": float(counts.min()) if counts.size else None,
            "peak_to_trough_hourly": float(counts.max() / counts.min())
            if counts.size and counts.min() > 0
            else None,
            "peak_to_trough_hour_of_day": pmax / pmin if pmin > 0 else None,
        }
    return out


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


def _quantile_curve(
    values: np.ndarray, n: int = CDF_POINTS, presorted: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    v = values if presorted else np.sort(values[np.isfinite(values)])
    if v.size == 0:
        return v, v
    p = np.linspace(0, 1, min(n, v.size))
    idx = np.minimum((p * (v.size - 1)).round().astype(int), v.size - 1)
    return v[idx], (idx + 1) / v.size


def group_cdfs(
    df: pl.DataFrame,
    key: str,
    value: str = T,
    sample: pl.DataFrame | None = None,
    known: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Per ``key`` group (largest MAX_GROUPS, the rest as "other"): exact n, median and p99
    from the full table (or from ``known`` core statistics); ECDF curves (CDF_POINTS points)
    from ``sample`` (default: the table)."""

    def grouped(d: pl.DataFrame, top: pl.Series) -> pl.DataFrame:
        return d.select(
            pl.when(pl.col(key).is_in(top.implode()))
            .then(pl.col(key).cast(pl.String))
            .otherwise(pl.lit("other"))
            .alias("g"),
            value,
        )

    if known is not None and len(known) <= MAX_GROUPS:  # core statistics already have them
        top = pl.Series(list(known), dtype=pl.String).cast(df.schema[key])
        exact = pl.DataFrame(
            {
                "g": list(known),
                "n": [v["count"] for v in known.values()],
                "median": [v["p50"] for v in known.values()],
                "p99": [v["p99"] for v in known.values()],
            }
        ).sort("n", descending=True)
    else:
        counts = df.group_by(key).len().sort("len", descending=True)
        top = pl.Series(counts.head(MAX_GROUPS)[key].to_list(), dtype=df.schema[key])
        exact = (
            grouped(df, top)
            .group_by("g")
            .agg(
                pl.len().alias("n"),
                pl.col(value).quantile(0.5, "linear").alias("median"),
                pl.col(value).quantile(0.99, "linear").alias("p99"),
            )
            .sort("n", descending=True)
        )
    lists = (
        grouped(sample if sample is not None else df, top)
        .group_by("g")
        .agg(pl.col(value).sort().alias("v"))
    )
    curves = dict(zip(lists["g"].to_list(), lists["v"], strict=True))
    out = {}
    for g, n, med, p99 in exact.iter_rows():
        v = curves.get(g)
        arr = v.to_numpy() if v is not None else np.array([], dtype=float)
        arr = arr[np.isfinite(arr)]
        x, y = _quantile_curve(arr, presorted=True)
        out[str(g)] = {"n": int(n), "median": _clean(med), "p99": _clean(p99), "x": x, "y": y}
    return out


def cold_agreement(records: pl.DataFrame, cold: pl.DataFrame) -> dict:
    """Do the replay's cold/warm flags (``X-Hearth-Cold``) agree with the platform's own
    cold-start records? They agree when every instance with an invocation flagged cold has a
    cold-start record. Reported, not counted as disagreement: recorded instances the replay
    reached with no invocation flagged cold (started ahead of demand: scale-out, pre-warm,
    the first invocation arrived after the start finished), and several cold-flagged
    invocations on one instance (with concurrency > 1, invocations queued behind a cold start
    are cold too).

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


@dataclass
class Analysis:
    label: str
    stats: dict
    curves: dict  # arrays for figures (not in JSON)


def analyze_trace(tr: Trace, seed: int = 0) -> Analysis:
    cold = tr.cold.filter(pl.col(T).is_not_null())
    st: dict = {"label": tr.label, "files": tr.files, "skipped_files": tr.skipped}
    st["core"] = core_statistics(cold)
    st["identity"] = R.check_identity(cold).to_dict()
    curves: dict = {}

    # one seeded row sample serves the fits, the CDF curves and the row correlations
    samp = cold.sample(FIT_SAMPLE, seed=seed) if cold.height > FIT_SAMPLE else cold
    tot = samp[T].to_numpy()
    pos = tot[tot > 0]
    if pos.size >= 3 and np.ptp(np.log(pos)) > 1e-9:
        st["fit_coldstart_lognormal"] = fit_lognormal(tot)
        curves["total"] = _quantile_curve(tot)
    else:
        st["fit_coldstart_lognormal"] = {
            "error": "too few distinct positive cold-start times to fit"
        }
    gaps = interarrival_gaps(cold)
    if gaps.size >= 10 and np.ptp(np.log(gaps)) > 1e-9:
        try:
            st["fit_interarrival_weibull"] = fit_weibull(_sample(gaps, FIT_SAMPLE, seed))
            curves["gaps"] = _quantile_curve(_sample(gaps, FIT_SAMPLE, seed))
        except ValueError as e:  # no sign change: degenerate gaps
            st["fit_interarrival_weibull"] = {"error": f"Weibull fit failed: {e}"}
    else:
        st["fit_interarrival_weibull"] = {
            "error": "fewer than 10 distinct gaps between cold starts"
        }

    groups = {"region": "region", "cluster": "clusterName", "pool": "poolName"}
    if tr.runtime is not None:
        rt = tr.runtime.select(
            "funcID", "runtime", "trigger", "invocation", "triggerType-invocationType"
        ).unique("funcID")

        def with_rt(d: pl.DataFrame) -> pl.DataFrame:
            return d.join(rt, on="funcID", how="left").with_columns(
                pl.col("runtime").fill_null("(not in runtime table)"),
                pl.col("trigger").fill_null("(not in runtime table)"),
            )

        cold, samp = with_rt(cold), with_rt(samp)
        groups |= {"runtime": "runtime", "trigger": "trigger"}
        st["runtime_table"] = {
            "functions": tr.runtime.height,
            "matched_coldstarts": int(cold["invocation"].is_not_null().sum()),
            "multi_trigger_functions": int((tr.runtime["n_triggers"] > 1).sum()),
        }
    st["cdf"] = {}
    curves["cdf"] = {}
    for name, col in groups.items():
        by = {"region": "by_region", "cluster": "by_cluster", "pool": "by_pool"}.get(name)
        c = group_cdfs(cold, col, sample=samp, known=st["core"][by] if by else None)
        curves["cdf"][name] = c
        st["cdf"][name] = {
            g: {"n": v["n"], "median": v["median"], "p99": v["p99"]} for g, v in c.items()
        }

    # component breakdown over time: the coarsest of day/hour/10 min/min/10 s/s giving >= 12 bins
    span = float(cold["time"].max() - cold["time"].min()) if cold.height else 0.0
    bucket = next((b for b in (86400.0, 3600.0, 600.0, 60.0, 10.0) if span / b >= 12), 1.0)
    comp_t = (
        cold.with_columns((pl.col("time") // bucket).alias("bucket"))
        .group_by("bucket")
        .agg(pl.len().alias("coldstarts"), *[pl.col(c).mean() for c in COMP], pl.col(T).mean())
        .sort("bucket")
    )
    curves["components_time"] = (bucket, comp_t)
    sums = cold.select([pl.col(c).sum() for c in [*COMP, T]]).row(0)
    row_share = cold.select([(pl.col(c) / pl.col(T)).mean().alias(c) for c in COMP]).row(0)
    st["components"] = {
        "share_of_total_time": {
            c: _clean(sums[i] / sums[-1]) if sums[-1] else None for i, c in enumerate(COMP)
        },
        "mean_share_per_coldstart": {c: _clean(row_share[i]) for i, c in enumerate(COMP)},
        "mean_seconds": {c: _clean(sums[i] / max(cold.height, 1)) for i, c in enumerate(COMP)},
        "bucket_s": bucket,
    }
    st["spearman"] = correlations(cold, seed, sample=samp)
    st["peak_to_trough"] = peak_to_trough(cold)
    curves["hourly"] = (
        cold.select((pl.col("time") // 3600).cast(pl.Int64).alias("h"), "region")
        .group_by("region", "h")
        .len()
        .sort("region", "h")
    )

    if tr.requests is not None and tr.requests.height:
        pf = per_function_rates(cold, tr.requests)
        curves["per_function"] = pf
        rates = pf.filter(pl.col("requests") > 0)["coldstart_rate"].to_numpy()
        both = pf.filter((pl.col("requests") > 0) & (pl.col("coldstarts") > 0))
        st["per_function"] = {
            "functions_with_requests": int((pf["requests"] > 0).sum()),
            "functions_with_coldstarts": int((pf["coldstarts"] > 0).sum()),
            "coldstart_rate_median": _clean(np.median(rates)) if rates.size else None,
            "coldstart_rate_p90": _clean(np.quantile(rates, 0.9)) if rates.size else None,
            "overall_coldstart_rate": _clean(pf["coldstarts"].sum() / max(pf["requests"].sum(), 1)),
            "spearman_requests_vs_coldstarts": _clean(
                stats.spearmanr(both["requests"], both["coldstarts"]).statistic
            )
            if both.height > 2
            else None,
        }
        if "cold" in tr.requests.columns:  # records written by the replay driver
            st["replay_cold_agreement"] = cold_agreement(tr.requests, cold)
        if same_clock(cold, tr.requests):
            u = utility_ratios(cold, tr.requests)["utility"].to_numpy()
            curves["utility"] = _quantile_curve(u)
            why = None
        else:
            u = np.array([])
            why = "cold-start and per-request times are on different clocks (e.g. Hearth's export is relative)"
        st["pod_utility"] = {
            "skipped": why,
            "pods": int(u.size),
            "fraction_below_1": _clean((u < 1).mean()) if u.size else None,
            "median": _clean(np.median(u)) if u.size else None,
            "approximation": "utility = (last request end on pod - (cold-start time + cold-start duration)) / "
            "cold-start duration; "
            "keep-alive excluded; pods without requests in the per-request rows are left out",
        }
    return Analysis(tr.label, _clean(st), curves)


# --------------------------------------------------------------------------------------------
# figures (matplotlib Agg) and report


def _time_unit(bucket: float) -> tuple[float, str]:
    if bucket >= 86400:
        return 86400.0, "day"
    if bucket >= 3600:
        return 3600.0, "hour"
    if bucket >= 60:
        return 60.0, "minute"
    return 1.0, "second"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _grid(plt, n: int, w: float = 5.2, h: float = 3.8, sharey: bool = True):
    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False, sharey=sharey)
    return fig, list(axes[0])


def figures(analyses: list[Analysis], out: Path) -> list[tuple[str, str]]:
    """Write PNGs into ``out``; returns (file name, caption). One panel per trace."""
    plt = _plt()
    n = len(analyses)
    made: list[tuple[str, str]] = []

    def save(
        fig, name: str, caption: str, bottom: float = 0.62, left: float = 0.75, wspace: float = 0.12
    ):
        # fixed margins (inches) instead of tight_layout: same look, a fraction of the cost
        w, h = fig.get_size_inches()
        fig.subplots_adjust(
            left=left / w, right=1 - 0.25 / w, bottom=bottom / h, top=1 - 0.72 / h, wspace=wspace
        )
        fig.savefig(out / name)
        plt.close(fig)
        made.append((name, caption))

    for grp, title in (
        ("region", "region"),
        ("cluster", "cluster"),
        ("runtime", "runtime"),
        ("trigger", "trigger type"),
        ("pool", "pool size (CPU millicores-memory MB)"),
    ):
        if not any(grp in a.curves["cdf"] for a in analyses):
            continue
        fig, axes = _grid(plt, n)
        names = sorted({g for a in analyses for g in a.curves["cdf"].get(grp, {})})
        palette = plt.get_cmap("tab10")
        color = {g: palette(i % 10) for i, g in enumerate(names)}  # same group, same colour
        for ax, a in zip(axes, analyses, strict=True):
            cur = a.curves["cdf"].get(grp)
            if not cur:
                ax.text(0.5, 0.5, "no runtime table given", ha="center", transform=ax.transAxes)
            else:
                for g, v in cur.items():
                    label = g.split("-", 1)[-1] if grp == "pool" and g.startswith("pool") else g
                    ax.step(
                        v["x"],
                        v["y"],
                        where="post",
                        label=f"{label} (n={v['n']:,})",
                        color=color[g],
                    )
                ax.legend(fontsize=8, loc="lower right")
            ax.set_xscale("log")
            ax.set_xlabel("cold-start time (s, log scale)")
            ax.set_title(a.label, fontsize=10)
        axes[0].set_ylabel("CDF")
        fig.suptitle(f"Cold-start time by {title}")
        save(fig, f"cdf_{grp}.png", f"CDF of cold-start time per {title} (log x).")

    # components over time (stacked means)
    fig, axes = _grid(plt, n, sharey=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, a in zip(axes, analyses, strict=True):
        bucket, ct = a.curves["components_time"]
        unit, name = _time_unit(bucket)
        x = ct["bucket"].to_numpy() * bucket / unit
        ys = [ct[c].to_numpy() for c in COMP]
        ax.stackplot(
            x, *ys, labels=[c.replace("Cost", "") for c in COMP], colors=colors, alpha=0.85
        )
        top = float(np.nanmax(np.sum(ys, axis=0))) if len(x) else 1.0
        ax.set_ylim(0, top * 1.35)
        ax.set_xlabel(name)
        ax.set_ylabel("mean seconds per cold start")
        ax.set_title(a.label, fontsize=10)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle("Cold-start components over time (stacked means)")
    save(
        fig,
        "components_time.png",
        "Mean of each cold-start component per time bucket, stacked.",
        wspace=0.3,
    )

    # shares bar chart (grouped by trace)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / n
    xs = np.arange(len(COMP))
    for i, a in enumerate(analyses):
        sh = a.stats["components"]["share_of_total_time"]
        ax.bar(xs + i * width, [sh[c] or 0 for c in COMP], width, label=a.label)
    ax.set_xticks(xs + width * (n - 1) / 2, [c.replace("Cost", "") for c in COMP])
    ax.set_ylabel("share of total cold-start time")
    ax.legend(fontsize=8)
    ax.set_title("Component shares")
    save(fig, "component_shares.png", "Share of total cold-start time spent in each component.")

    # fits
    fig, axes = _grid(plt, n)
    for ax, a in zip(axes, analyses, strict=True):
        if "total" not in a.curves:
            ax.text(
                0.5,
                0.5,
                a.stats["fit_coldstart_lognormal"]["error"],
                ha="center",
                transform=ax.transAxes,
                wrap=True,
            )
            continue
        x, y = a.curves["total"]
        f = a.stats["fit_coldstart_lognormal"]
        ax.step(x, y, where="post", label="empirical", color="k")
        grid = np.logspace(np.log10(max(x.min(), 1e-4)), np.log10(x.max()), 300)
        ax.plot(
            grid,
            stats.lognorm.cdf(grid, f["sigma"], scale=math.exp(f["mu"])),
            "--",
            label=f"fit: mean {f['mean']:.2f}s sd {f['sd']:.2f}s (KS {f['ks_vs_fit']:.3f})",
        )
        p = f["published"]
        ax.plot(
            grid,
            stats.lognorm.cdf(grid, p["sigma"], scale=math.exp(p["mu"])),
            ":",
            label=f"published: mean 3.24s sd 7.10s (KS {f['ks_vs_published']:.3f})",
        )
        ax.set_xscale("log")
        ax.set_xlabel("cold-start time (s, log scale)")
        ax.set_title(a.label, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("CDF")
    fig.suptitle("Cold-start time: LogNormal fit")
    save(
        fig,
        "fit_coldstart.png",
        "Empirical CDF of cold-start time with the fitted and the published LogNormal.",
    )

    if any("gaps" in a.curves for a in analyses):
        fig, axes = _grid(plt, n)
        for ax, a in zip(axes, analyses, strict=True):
            if "gaps" not in a.curves:
                ax.text(
                    0.5,
                    0.5,
                    a.stats["fit_interarrival_weibull"]["error"],
                    ha="center",
                    transform=ax.transAxes,
                )
                continue
            x, y = a.curves["gaps"]
            f = a.stats["fit_interarrival_weibull"]
            ax.step(x, y, where="post", label="empirical", color="k")
            grid = np.logspace(np.log10(max(x.min(), 1e-6)), np.log10(x.max()), 300)
            ax.plot(
                grid,
                stats.weibull_min.cdf(grid, f["shape"], scale=f["scale"]),
                "--",
                label=f"fit: mean {f['mean']:.2f}s sd {f['sd']:.2f}s (KS {f['ks_vs_fit']:.3f})",
            )
            p = f["published"]
            ax.plot(
                grid,
                stats.weibull_min.cdf(grid, p["shape"], scale=p["scale"]),
                ":",
                label=f"published: mean 1.25s sd 3.66s (KS {f['ks_vs_published']:.3f})",
            )
            ax.set_xscale("log")
            ax.set_xlabel("time between cold starts (s, log scale)")
            ax.set_title(a.label, fontsize=10)
            ax.legend(fontsize=8, loc="upper left")
        axes[0].set_ylabel("CDF")
        fig.suptitle("Time between cold starts: Weibull fit")
        save(
            fig,
            "fit_interarrival.png",
            "Empirical CDF of inter-cold-start times with fitted and published Weibull.",
        )

    # spearman heatmaps (per function)
    fig, axes = _grid(plt, n, w=5.0, h=4.4, sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        m = a.stats["spearman"]["per_function"]
        if not m:
            continue
        cols = list(m)
        mat = np.array([[m[r][c] if m[r][c] is not None else np.nan for c in cols] for r in cols])
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
        short = [c.replace("Cost", "").replace("_cold_start", "") for c in cols]
        ax.set_xticks(range(len(cols)), short, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(cols)), short, fontsize=8)
        for i in range(len(cols)):
            for j in range(len(cols)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.grid(False)
        ax.set_title(a.label, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Spearman correlation across functions")
    save(
        fig,
        "spearman.png",
        "Spearman rank correlations across functions.",
        bottom=1.25,
        left=1.35,
        wspace=0.6,
    )

    # cold starts per hour
    fig, axes = _grid(plt, n, w=6.0, sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        hr = a.curves["hourly"]
        for (region,), part in hr.partition_by("region", as_dict=True, maintain_order=True).items():
            ax.plot(part["h"].to_numpy() / 24, part["len"].to_numpy(), lw=0.8, label=str(region))
        ax.set_xlabel("day")
        ax.set_ylabel("cold starts per hour")
        ax.set_title(a.label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Cold starts per hour (peak-to-trough)")
    save(fig, "coldstarts_per_hour.png", "Cold starts per hour per region.", wspace=0.3)

    if any("per_function" in a.curves for a in analyses):
        fig, axes = _grid(plt, n, sharey=False)
        for ax, a in zip(axes, analyses, strict=True):
            pf = a.curves.get("per_function")
            if pf is None:
                ax.text(0.5, 0.5, "no per-request rows given", ha="center", transform=ax.transAxes)
                continue
            p2 = pf.filter((pl.col("requests") > 0) & (pl.col("coldstarts") > 0))
            ax.scatter(p2["requests"], p2["coldstarts"], s=6, alpha=0.5)
            lim = [1, max(float(p2["requests"].max() or 1), 10)]
            ax.plot(lim, lim, "k:", lw=0.8, label="every request cold")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("requests per function")
            ax.set_ylabel("cold starts per function")
            ax.set_title(a.label, fontsize=10)
            ax.legend(fontsize=8)
        fig.suptitle("Requests vs cold starts per function")
        save(
            fig,
            "requests_vs_coldstarts.png",
            "Requests vs cold starts per function (log-log).",
            wspace=0.3,
        )

        fig, axes = _grid(plt, n)
        for ax, a in zip(axes, analyses, strict=True):
            if "utility" not in a.curves:
                continue
            x, y = a.curves["utility"]
            ax.step(np.maximum(x, 1e-3), y, where="post")
            ax.axvline(1.0, color="r", ls=":", lw=1)
            fb = a.stats["pod_utility"]["fraction_below_1"]
            ax.set_xscale("log")
            ax.set_xlabel("pod utility ratio (log scale)")
            ax.set_title(f"{a.label}: {fb:.1%} below 1" if fb is not None else a.label, fontsize=10)
        axes[0].set_ylabel("CDF")
        fig.suptitle("Pod utility ratio (useful lifetime / cold-start time)")
        save(fig, "pod_utility.png", "CDF of pod utility ratio; red line at 1.")
    return made


def _table(rows: list[list], header: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v)) if v is not None else "–"

    h = "".join(f"<th>{html.escape(x)}</th>" for x in header)
    b = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def render_html(analyses: list[Analysis], figs: list[tuple[str, str]]) -> str:
    labels = [a.label for a in analyses]
    S_ = [a.stats for a in analyses]

    def row(name, get):
        vals = []
        for s in S_:
            try:
                vals.append(get(s))
            except (KeyError, TypeError):
                vals.append(None)
        return [name, *vals]

    summary = [
        row("cold starts", lambda s: s["core"]["overall"]["count"]),
        row("functions", lambda s: s["core"]["overall"]["functions"]),
        row("mean cold-start time (s)", lambda s: s["core"]["overall"]["mean"]),
        row("sd (s)", lambda s: s["core"]["overall"]["sd"]),
        row(
            "p50 / p99 (s)",
            lambda s: f"{s['core']['overall']['p50']:.3g} / {s['core']['overall']['p99']:.3g}",
        ),
        row(
            "LogNormal fit mean / sd (s)",
            lambda s: (
                f"{s['fit_coldstart_lognormal']['mean']:.3g} / {s['fit_coldstart_lognormal']['sd']:.3g}"
            ),
        ),
        row(
            "KS vs fit / vs published LogNormal",
            lambda s: (
                f"{s['fit_coldstart_lognormal']['ks_vs_fit']:.3f} / {s['fit_coldstart_lognormal']['ks_vs_published']:.3f}"
            ),
        ),
        row(
            "Weibull fit mean / sd (s)",
            lambda s: (
                f"{s['fit_interarrival_weibull']['mean']:.3g} / {s['fit_interarrival_weibull']['sd']:.3g}"
            ),
        ),
        row(
            "KS vs fit / vs published Weibull",
            lambda s: (
                f"{s['fit_interarrival_weibull']['ks_vs_fit']:.3f} / {s['fit_interarrival_weibull']['ks_vs_published']:.3f}"
            ),
        ),
        row(
            "identity violations (total = sum of components)",
            lambda s: f"{s['identity']['violations']} of {s['identity']['rows']}",
        ),
        *[
            row(f"share {c}", lambda s, c=c: s["components"]["share_of_total_time"][c])
            for c in COMP
        ],
        row(
            "per-function cold-start rate (median)",
            lambda s: s["per_function"]["coldstart_rate_median"],
        ),
        row("pods with utility ratio < 1", lambda s: s["pod_utility"]["fraction_below_1"]),
        row(
            "peak-to-trough (hourly, first region)",
            lambda s: next(iter(s["peak_to_trough"].values()))["peak_to_trough_hourly"],
        ),
    ]
    imgs = "\n".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for f, c in figs
    )
    skipped = "".join(f"<li>{html.escape(x)}</li>" for s in S_ for x in s.get("skipped_files", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Hearth cold-start report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}
figcaption{{color:#555;font-size:90%}}</style></head><body>
<h1>Cold-start report</h1>
<p>Traces: {html.escape(" | ".join(labels))}. Every statistic is in <a href="stats.json">stats.json</a>.</p>
{_table(summary, ["statistic", *labels])}
{imgs}
{"<h2>Skipped files</h2><ul>" + skipped + "</ul>" if skipped else ""}
</body></html>
"""


def run(
    groups: list[list[str | Path]], out: str | Path, seed: int = 0, labels: list[str] | None = None
) -> dict:
    """Analyse each group of paths as one trace; write stats.json, PNGs and report.html."""
    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    analyses = []
    for i, g in enumerate(groups):
        tr = load_trace(g, labels[i] if labels else None)
        analyses.append(analyze_trace(tr, seed))
    figs = figures(analyses, outd)
    doc = {"traces": [a.stats for a in analyses], "figures": [f for f, _ in figs]}
    (outd / "stats.json").write_text(json.dumps(_clean(doc), indent=1, default=str) + "\n")
    (outd / "report.html").write_text(render_html(analyses, figs))
    return doc
