"""Exact statistics of cold-start times, read off one sort: quantiles, CDF curves, the core
statistics per region/cluster/pool, per-group CDFs and the hourly peak-to-trough.

The cold-start times are sorted once (:class:`SortedTotals`); a stable radix sort of a key's
codes in that order gives each group's sorted values."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import math

import numpy as np
import polars as pl

from .threads import InThread
from .trace_columns import COMP, Columns, Groups, T, per_hour_frames

CDF_POINTS = 2_000  # points per drawn CDF curve (exact quantiles of the full data)
MAX_GROUPS = 8
QUANTILES = (0.5, 0.9, 0.99)
QNAMES = tuple(f"p{int(q * 100)}" for q in QUANTILES)
GROUP_KEYS = {"region": "region", "cluster": "clusterName", "pool": "poolName"}


def quantiles_sorted(v: np.ndarray, qs=QUANTILES) -> np.ndarray:
    """numpy's default ('linear') quantiles of an ascending array, read off by index (no
    re-partitioning): the same formula as ``np.quantile``, NaN if the data hold a NaN."""
    q = np.asarray(qs, dtype=float)
    n = v.size
    if n == 0:
        return np.full(q.shape, np.nan)
    if np.isnan(v[-1]):  # NaN sorts last; numpy's quantile is NaN then
        return np.full(q.shape, np.nan)
    virt = (n - 1) * q
    lo = np.floor(virt)
    gamma = virt - lo
    lo = np.clip(lo.astype(np.intp), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    a, b = v[lo], v[hi]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def cdf_points(v: np.ndarray, n: int = CDF_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points (x, ECDF(x)) of an ascending array, at evenly spaced ranks (first
    and last included). Drawn as a step function, the curve is within 1/(n-1) of the exact
    ECDF everywhere; non-finite values are left out."""
    if v.size and not (np.isfinite(v[0]) and np.isfinite(v[-1])):
        v = v[np.isfinite(v)]
    if v.size == 0:
        return v, v
    m = min(n, v.size)
    idx = np.unique(np.round(np.linspace(0, v.size - 1, m)).astype(np.intp))
    return v[idx], (idx + 1) / v.size


def sort_order(v: np.ndarray) -> np.ndarray:
    """Indices that sort ``v`` ascending (NaN last, as numpy). polars' sort on one thread: half
    the CPU of ``np.argsort`` here, and no pool threads competing with the analysis' own
    threads (each sort already runs beside other work)."""
    s = pl.Series("v", v)
    return s.to_frame().select(pl.arg_sort_by("v", multithreaded=False)).to_series().to_numpy()


def sorted_values(v: np.ndarray) -> np.ndarray:
    """``np.sort(v)`` (NaN last) by polars on one thread (see :func:`sort_order`)."""
    return pl.Series("v", v).sort(multithreaded=False).to_numpy()


class SortedTotals:
    """The cold-start times sorted once. Quantiles, CDF curves and KS distances of the whole
    table and of every group are read off this order."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.order = sort_order(x)  # ties are equal values: their order is irrelevant
        self.sorted = x[self.order]

    def by_group(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Values sorted by (group, value) and the k+1 group offsets into them."""
        if k == 1:
            return self.sorted, np.array([0, self.sorted.size], dtype=np.int64)
        cs = codes[self.order]
        small = np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.int64
        perm = np.argsort(cs.astype(small, copy=False), kind="stable")  # radix sort: O(n)
        offs = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(np.bincount(cs, minlength=k), out=offs[1:])
        return self.sorted[perm], offs


def _overall_stats(cols: Columns) -> dict:
    n = cols.n
    x = cols.x
    tot = float(x.sum()) if n else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        o = {
            "count": n,
            "mean": float(x.mean()) if n else None,
            "sd": float(x.std(ddof=1)) if n > 1 else None,
            **{f"share_{c}": float(v.sum()) / tot if tot else None for c, v in cols.comp.items()},
            "functions": cols.groups["function"].k,
            "t_min": float(np.nanmin(cols.time)) if n else None,
            "t_max": float(np.nanmax(cols.time)) if n else None,
        }
    return o


def core_from(cols: Columns, srt: SortedTotals, grouped: dict | None = None) -> dict:
    o = _overall_stats(cols)
    if srt.x.size:
        o |= dict(zip(QNAMES, (float(v) for v in quantiles_sorted(srt.sorted)), strict=True))
    out = {"overall": json_safe(o)}
    for name in GROUP_KEYS:
        g = cols.groups[name]
        vals, offs = grouped[name] if grouped else srt.by_group(g.codes, g.k)
        count, means = cols.means(g.index, g.k)
        rows = {}
        for i, key in enumerate(g.names):
            if count[i] == 0:
                continue
            q = quantiles_sorted(vals[offs[i] : offs[i + 1]])
            rows[key] = json_safe(
                {
                    "count": int(count[i]),
                    "mean": means[T][i],
                    **{f"mean_{c}": means[c][i] for c in COMP},
                    **dict(zip(QNAMES, q, strict=True)),
                }
            )
        out[f"by_{name}"] = rows
    return out


def core_statistics(cold: pl.DataFrame | pl.LazyFrame) -> dict:
    """The notebook's core numbers, exact on the whole table: count, mean, sd, p50/p90/p99 and
    component means, overall and per region, cluster and pool; component shares; distinct
    functions."""
    df = cold.collect() if isinstance(cold, pl.LazyFrame) else cold
    x = df[T].cast(pl.Float64).to_numpy()
    sorting = InThread(SortedTotals, x)
    cols = Columns(df, GROUP_KEYS, x)
    return core_from(cols, sorting.result())


def json_safe(d):
    if isinstance(d, dict):
        return {str(k): json_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_safe(v) for v in d]
    if isinstance(d, (float, np.floating)):
        f = float(d)
        return f if math.isfinite(f) else None
    if isinstance(d, np.integer):
        return int(d)
    return d


def peak_to_trough(cold: pl.DataFrame) -> dict:
    """Peak/trough of cold starts per hour (complete hours only) and of the mean hour-of-day
    profile, per region."""
    return peak_to_trough_from(per_hour_frames(Columns(cold, {"region": "region"}))[1])


def peak_to_trough_from(hourly: pl.DataFrame) -> dict:
    out = {}
    for (region,), part in hourly.partition_by("region", as_dict=True, maintain_order=True).items():
        h = part.select("h", "len")
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


def group_cdfs(
    srt: SortedTotals, g: Groups, grouped: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, dict]:
    """Per group (the MAX_GROUPS largest; the rest together as "other"), largest first: exact
    n, median and p99, and the CDF curve (``cdf_points`` of the group's sorted values)."""
    if g.k > MAX_GROUPS:
        counts = np.bincount(g.index, minlength=g.k)
        top = np.argsort(-counts, kind="stable")[:MAX_GROUPS]
        remap = np.full(g.k, MAX_GROUPS, dtype=np.int64)
        remap[top] = np.arange(MAX_GROUPS)
        names = [g.names[i] for i in top] + ["other"]
        vals, offs = srt.by_group(remap[g.codes], MAX_GROUPS + 1)
    else:
        names = g.names
        vals, offs = grouped if grouped is not None else srt.by_group(g.codes, g.k)
    sizes = np.diff(offs)
    out = {}
    for i in np.argsort(-sizes, kind="stable"):
        if sizes[i] == 0:
            continue
        v = vals[offs[i] : offs[i + 1]]
        med, p99 = quantiles_sorted(v, (0.5, 0.99))
        x, y = cdf_points(v)
        out[names[i]] = {
            "n": int(v.size),
            "median": json_safe(med),
            "p99": json_safe(p99),
            "x": x,
            "y": y,
        }
    return out
