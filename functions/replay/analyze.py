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
  curve). When a core is idle, a forked process draws about half of them (see :func:`run`).
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import contextlib
import gc
import html
import json
import math
import os
import select
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
from scipy import optimize, special  # not scipy.stats: 0.3 s to import, for three formulas

from . import readers as R
from . import schemas as S
from .synth import PUBLISHED, lognormal_moments, lognormal_params, weibull_moments, weibull_params

FIT_SAMPLE = 400_000  # Weibull fit: seeded sample of at most this many gaps
SPEARMAN_ROWS = 400_000  # per-row Spearman matrix: seeded sample of at most this many rows
CDF_POINTS = 2_000  # points per drawn CDF curve (exact quantiles of the full data)
MAX_GROUPS = 8
MISSING = "(missing)"  # name of the group of rows whose key is empty
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
    # requestID is only needed to match per-request rows; without them it is not built
    skip = () if "huawei-request" in kinds else ("requestID",)
    cold = R.read_coldstarts(kinds["huawei-coldstart"], exclude=skip)
    runtime = R.read_runtime(kinds["huawei-runtime"]) if "huawei-runtime" in kinds else None
    req = R.read_requests(kinds["huawei-request"]) if "huawei-request" in kinds else None
    lab = label or ", ".join(Path(p).name or str(p) for p in paths)
    return Trace(lab, cold, runtime, req, skipped, {k: len(v) for k, v in kinds.items()})


# --------------------------------------------------------------------------------------------
# pure statistics


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


@dataclass
class Groups:
    """Dense integer codes (0..k-1) of a key column; names sorted, empty keys as MISSING."""

    names: list[str]
    codes: np.ndarray  # compact (uint8/uint16): cheap to gather and to radix-sort

    @property
    def k(self) -> int:
        return len(self.names)

    @cached_property
    def index(self) -> np.ndarray:
        """The codes as ``np.intp``, cast once: ``np.bincount`` copies any other dtype to intp
        on every call (16 MB and its page faults per call at 2 M rows)."""
        return self.codes.astype(np.intp)


def sort_order(v: np.ndarray) -> np.ndarray:
    """Indices that sort ``v`` ascending (NaN last, as numpy). polars' sort on one thread: half
    the CPU of ``np.argsort`` here, and no pool threads competing with the analysis' own
    threads (each sort already runs beside other work)."""
    s = pl.Series("v", v)
    return s.to_frame().select(pl.arg_sort_by("v", multithreaded=False)).to_series().to_numpy()


def sorted_values(v: np.ndarray) -> np.ndarray:
    """``np.sort(v)`` (NaN last) by polars on one thread (see :func:`sort_order`)."""
    return pl.Series("v", v).sort(multithreaded=False).to_numpy()


def average_ranks(s: pl.Series) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (polars' ``rank("average")``), from one
    single-threaded sort: a third of the CPU of polars' parallel rank on two busy cores.
    Nulls keep a null (NaN) rank."""
    if s.null_count():
        return s.rank("average").cast(pl.Float64).to_numpy()
    v = s.cast(pl.Float64).to_numpy()
    n = v.size
    if n == 0:
        return np.zeros(0)
    order = sort_order(v)
    sv = v[order]
    first = np.empty(n, dtype=bool)  # first of a run of equal values
    first[0] = True
    np.not_equal(sv[1:], sv[:-1], out=first[1:])
    if np.isnan(sv[-1]):  # NaNs tie with each other, as in polars
        first[1:] &= ~(np.isnan(sv[1:]) & np.isnan(sv[:-1]))
    start = np.flatnonzero(first)
    end = np.append(start[1:], n)
    ranks = np.empty(n)
    ranks[order] = np.repeat((start + end + 1) / 2.0, end - start)
    return ranks


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


class _InThread:
    """``fn(*args)`` running in a thread (numpy sorts and polars release the GIL);
    ``.result()`` joins it. No reference cycles: with the GC paused during a run (see
    :func:`run`), its arrays are freed as soon as the analysis drops them."""

    def __init__(self, fn: Callable, *args):
        self._box: dict = {}
        self._thread = threading.Thread(target=self._target, args=(fn, args), daemon=True)
        self._thread.start()

    def _target(self, fn: Callable, args: tuple) -> None:
        try:
            self._box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._box["error"] = e

    def result(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def _categorical() -> pl.DataType:
    """A Categorical with its own category mapping (compact codes, freed with the column),
    not the process-wide one, which keeps every string it has ever seen."""
    cats = getattr(pl, "Categories", None)
    return pl.Categorical(cats.random()) if cats is not None else pl.Categorical()


def group_codes_many(df: pl.DataFrame, cols: list[str]) -> dict[str, Groups]:
    """``group_codes`` of several columns; the strings of all of them are hashed in one polars
    pass (one column per thread)."""
    cat = df.select([pl.col(c).cast(pl.String).cast(_categorical()) for c in dict.fromkeys(cols)])
    return {c: _codes_of(cat[c]) for c in cols}


def group_codes(s: pl.Series) -> Groups:
    return _codes_of(s.cast(pl.String).cast(_categorical()))


def _codes_of(c: pl.Series) -> Groups:
    cats = getattr(c.dtype, "categories", None)
    if cats is not None and hasattr(cats, "to_series") and not cats.is_global():
        # the column's own mapping (see _categorical): its ids are 0..k-1, its categories
        # exactly the column's values, so no pass over the rows is needed to find them
        names = cats.to_series().to_list()
        phys = c.to_physical()
        if phys.null_count():
            phys = phys.fill_null(len(names))
            names.append(MISSING)
        return _in_name_order(names, phys.to_numpy())
    u = c.unique()
    names = u.cast(pl.String).fill_null(MISSING).to_list()
    up = u.to_physical()
    sentinel = int(up.max()) + 1 if up.null_count() < up.len() else 0
    up_np = up.fill_null(sentinel).to_numpy().astype(np.int64)
    ids = np.zeros(int(up_np.max()) + 1 if up_np.size else 1, dtype=np.int64)
    ids[up_np] = np.arange(len(names))  # physical id -> position in names
    return _in_name_order(names, ids[c.to_physical().fill_null(sentinel).to_numpy()])


def _in_name_order(names: list[str], idx: np.ndarray) -> Groups:
    """Groups from each row's index into ``names``, renumbered in name order (compact)."""
    rank = np.argsort(np.array(names, dtype=object), kind="stable")
    small = np.uint8 if len(names) <= 256 else np.uint16 if len(names) <= 65536 else np.int64
    lut = np.empty(max(len(names), 1), dtype=small)
    lut[rank] = np.arange(len(names))
    return Groups([names[i] for i in rank], lut[idx])


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense codes of the pairs (a, b) (a: codes >= 0, b: any int64), numbered in (a, b)
    order; and the a and b of each code."""
    if a.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    a = a.astype(np.int64, copy=False)
    bmin = int(b.min())
    span = int(b.max()) - bmin + 1
    amax = int(a.max())
    key = b - bmin  # + a * span, without n-sized temporaries when a is all 0 (one region)
    if amax > 0:
        key += a * span
    if span * (amax + 1) <= 8 * a.size + 4096:  # small key space: counting
        cnt = np.bincount(key)
        present = np.flatnonzero(cnt)
        lut = np.zeros(cnt.size, dtype=np.int64)
        lut[present] = np.arange(present.size)
        inv = lut[key]
    else:  # sparse (e.g. epoch-second hours over years): sort
        present, inv = np.unique(key, return_inverse=True)
    return inv, present // span, present % span + bmin


class Columns:
    """The numeric columns of a cold-start table as numpy arrays and its key columns as
    integer codes. Group aggregations are bincounts over the codes, so each key's strings are
    hashed once, not once per aggregation."""

    def __init__(self, df: pl.DataFrame, keys: dict[str, str], x: np.ndarray | None = None):
        """``x``: the total column as numpy, if the caller has it already (each conversion of
        a column read from many files is a copy)."""
        self.n = df.height
        self.x = df[T].cast(pl.Float64).to_numpy() if x is None else x
        self.comp = {c: df[c].cast(pl.Float64).to_numpy() for c in COMP}
        self.time = df["time"].cast(pl.Float64).to_numpy()
        self.keys = dict(keys) | {"function": "funcID"}
        codes = group_codes_many(df, list(self.keys.values()))
        self.groups = {name: codes[col] for name, col in self.keys.items()}

    def sums(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows and sums of the total and of each component per code."""
        cols = {T: self.x, **self.comp}
        if k == 1:  # e.g. one region: plain sums, no pass over the codes
            return np.array([codes.size]), {c: np.array([v.sum()]) for c, v in cols.items()}
        count = np.bincount(codes, minlength=k)
        return count, {c: np.bincount(codes, weights=v, minlength=k) for c, v in cols.items()}

    def means(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        count, sums = self.sums(codes, k)
        return count, _means(count, sums)

    def per_time(self, width: float, by_region: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
        """Per (region and) time bucket of ``width`` seconds, in (region, bucket) order: the
        region code and bucket of each group, its rows and means. Rows whose time is not
        finite are left out."""
        ok = np.isfinite(self.time)
        every = bool(ok.all())
        t = np.floor_divide(self.time if every else self.time[ok], width).astype(np.int64)
        one = not by_region or self.groups["region"].k == 1
        reg = np.broadcast_to(np.intp(0), (self.n,)) if one else self.groups["region"].index
        inv, r, b = _pairs(reg if every else reg[ok], t)
        cols = {T: self.x, **self.comp}
        if not every:
            cols = {c: v[ok] for c, v in cols.items()}
        count = np.bincount(inv, minlength=r.size)
        sums = {c: np.bincount(inv, weights=v, minlength=r.size) for c, v in cols.items()}
        return r, b, {"count": count, **_means(count, sums), "sums": sums}


def _means(count: np.ndarray, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return {c: v / count for c, v in sums.items()}


def _coarser(b: np.ndarray, m: dict, factor: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Buckets ``factor`` times wider from finer per-bucket counts and sums (e.g. days from
    (region, hour) groups): (bucket, {count, means})."""
    inv, _, wide = _pairs(np.zeros(b.size, dtype=np.int64), np.floor_divide(b, factor))
    k = wide.size
    count = np.bincount(inv, weights=m["count"], minlength=k)
    sums = {c: np.bincount(inv, weights=v, minlength=k) for c, v in m["sums"].items()}
    return wide, {"count": count, **_means(count, sums)}


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


def _core(cols: Columns, srt: SortedTotals, grouped: dict | None = None) -> dict:
    o = _overall_stats(cols)
    if srt.x.size:
        o |= dict(zip(QNAMES, (float(v) for v in quantiles_sorted(srt.sorted)), strict=True))
    out = {"overall": _clean(o)}
    for name in GROUP_KEYS:
        g = cols.groups[name]
        vals, offs = grouped[name] if grouped else srt.by_group(g.codes, g.k)
        count, means = cols.means(g.index, g.k)
        rows = {}
        for i, key in enumerate(g.names):
            if count[i] == 0:
                continue
            q = quantiles_sorted(vals[offs[i] : offs[i + 1]])
            rows[key] = _clean(
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
    sorting = _InThread(SortedTotals, x)
    cols = Columns(df, GROUP_KEYS, x)
    return _core(cols, sorting.result())


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
    return _ks(np.asarray(cdf, dtype=float), lambda c: c)


KS_BLOCK = 1 << 16  # points per block of a KS distance (its temporaries stay in cache)


def _ks(t: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray]) -> float:
    """KS D of an ascending sample given as ``t`` (the sample or a monotone transform of it,
    e.g. its logs) and ``cdf(block)``: the model CDF at a copy of a block of ``t`` (it may
    overwrite its argument). With d_i = i/n - c_i, D = max(max d, 1/n - min d). Computed block
    by block: no n-sized temporaries (at 2 M points each is 16 MB of fresh pages)."""
    n = t.size
    hi, lo = -np.inf, np.inf
    for s in range(0, n, KS_BLOCK):
        d = cdf(t[s : s + KS_BLOCK].copy())
        np.subtract(np.arange(s + 1, s + 1 + d.size, dtype=float) / n, d, out=d)
        hi, lo = max(hi, float(d.max())), min(lo, float(d.min()))
    return max(hi, 1.0 / n - lo) if n else 0.0


def _lognorm_cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return special.ndtr((np.log(x) - mu) / sigma)


def _weibull_cdf(x: np.ndarray, k: float, lam: float) -> np.ndarray:
    return -np.expm1(-((x / lam) ** k))


def fit_lognormal(x: np.ndarray, presorted: bool = False) -> dict:
    """LogNormal MLE of the positive values, KS distances to the fit and to the published
    parameters; all on the whole array (``presorted``: ``x`` is ascending already)."""
    x = x if presorted else np.sort(x)
    x = x[np.searchsorted(x, 0.0, side="right") :]  # positive values
    if x.size and not np.isfinite(x[-1]):  # NaN and inf sort last
        x = x[np.isfinite(x)]
    lx = np.log(x)
    mu, sigma = float(lx.mean()), float(lx.std(ddof=0))
    mean, sd = lognormal_moments(mu, sigma)
    pmu, psig = lognormal_params(**PUBLISHED["coldstart_lognormal"])
    n = x.size

    def ks(m: float, s: float) -> float:
        def cdf(c: np.ndarray) -> np.ndarray:
            c -= m
            c /= s
            return special.ndtr(c, out=c)

        return _ks(lx, cdf)

    return {
        "n": int(n),
        "mu": mu,
        "sigma": sigma,
        "mean": mean,
        "sd": sd,
        "empirical_mean": float(x.mean()),
        "empirical_sd": float(x.std()),
        "ks_vs_fit": ks(mu, sigma),
        "ks_vs_published": ks(pmu, psig),
        "published": PUBLISHED["coldstart_lognormal"] | {"mu": pmu, "sigma": psig},
    }


def weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Weibull (shape, scale) MLE with location 0, from the profile likelihood equation."""
    lx = np.log(x)
    mlx = lx.mean()
    z = lx - lx.max()  # scale-free: x^k / max^k
    w, wl = np.empty_like(z), np.empty_like(z)  # reused by every step of the root search

    def g(logk: float) -> float:  # no BLAS (np.dot): its spinning threads cost more than this
        k = math.exp(logk)
        np.exp(np.multiply(z, k, out=w), out=w)
        return float(np.multiply(w, lx, out=wl).sum() / w.sum() - 1.0 / k - mlx)

    k = math.exp(optimize.brentq(g, math.log(0.01), math.log(100.0), xtol=1e-10))
    lam = float(np.exp(mlx + np.log(np.mean(np.exp(k * (lx - mlx)))) / k))
    return k, lam


def _fill_zero_gaps(g: np.ndarray, resolution: float | None = None) -> np.ndarray:
    if g.size == 0:
        return g
    zero = g <= 0
    if not zero.any():
        return g
    if resolution is None:  # the smallest positive gap
        resolution = float(np.min(g, where=g > 0, initial=np.inf))
        resolution = resolution if math.isfinite(resolution) else 1e-3
    return np.where(zero, resolution / 2, g)


def interarrival_gaps(cold: pl.DataFrame, resolution: float | None = None) -> np.ndarray:
    """Time between consecutive cold starts within each region. Zero gaps (ties at the trace's
    time resolution) are replaced by half the resolution so the Weibull likelihood is defined."""
    if cold["region"].n_unique() == 1:  # the usual case: no sort by (string, time) needed
        g = np.diff(cold["time"].cast(pl.Float64).sort(multithreaded=False).to_numpy())
    else:
        g = (
            cold.select("region", "time")
            .sort(["region", "time"])
            .select(pl.col("time").diff().over("region").alias("g"))
            .drop_nulls()["g"]
            .to_numpy()
        )
    return _fill_zero_gaps(g, resolution)


def fit_weibull(
    gaps: np.ndarray, seed: int = 0, sample: int = FIT_SAMPLE, presorted: bool = False
) -> dict:
    """Weibull MLE on a seeded sample of at most ``sample`` gaps (drawn with replacement; the
    shape equation is solved on the sample), KS distances on all gaps."""
    gaps = gaps if presorted else np.sort(gaps)
    fit_on = _sample(gaps, sample, seed)
    k, lam = weibull_mle(fit_on)
    mean, sd = weibull_moments(k, lam)
    pk, plam = weibull_params(**PUBLISHED["interarrival_weibull"])
    lg = np.log(gaps)
    n = gaps.size

    def ks(shape: float, scale: float) -> float:
        def cdf(c: np.ndarray) -> np.ndarray:  # 1 - exp(-(x/scale)^shape), in place
            c -= math.log(scale)
            c *= shape
            np.exp(c, out=c)
            np.negative(c, out=c)
            np.expm1(c, out=c)
            return np.negative(c, out=c)

        return _ks(lg, cdf)

    return {
        "n": int(n),
        "fit_n": int(fit_on.size),
        "fit_sampled": bool(n > sample),
        "shape": k,
        "scale": lam,
        "mean": mean,
        "sd": sd,
        "empirical_mean": float(gaps.mean()),
        "empirical_sd": float(gaps.std()),
        "ks_vs_fit": ks(k, lam),
        "ks_vs_published": ks(pk, plam),
        "published": PUBLISHED["interarrival_weibull"] | {"shape": pk, "scale": plam},
    }


def _spearman(df: pl.DataFrame) -> dict:
    if df.height < 3:
        return {}
    m = _correlation(np.vstack([average_ranks(df[c]) for c in df.columns]))
    cols = df.columns
    return {a: {b: _clean(m[i, j]) for j, b in enumerate(cols)} for i, a in enumerate(cols)}


def _correlation(rows: np.ndarray) -> np.ndarray:
    """Pearson correlations of the rows of ``rows`` (overwritten), as ``np.corrcoef`` but
    without BLAS, whose spinning worker threads cost more CPU than these few dot products.
    A constant or NaN row gives NaN (null in the JSON)."""
    rows -= rows.mean(axis=1, keepdims=True)
    k = rows.shape[0]
    cov, prod = np.empty((k, k)), np.empty_like(rows[0])
    for i in range(k):
        for j in range(i + 1):
            cov[i, j] = cov[j, i] = np.multiply(rows[i], rows[j], out=prod).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt(np.diag(cov))
        return np.clip(cov / d[:, None] / d[None, :], -1.0, 1.0)


def _row_sample(cold: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """Seeded sample (without replacement) of at most ``n`` rows of the numeric columns."""
    d = cold.select([T, *COMP])
    if d.height <= n:
        return d
    idx = np.sort(np.random.default_rng(seed).choice(d.height, n, replace=False))
    return d[idx]


def _per_function_frame(cols: Columns) -> pl.DataFrame:
    g = cols.groups["function"]
    count, means = cols.means(g.index, g.k)
    keep = count > 0
    return pl.DataFrame(
        {"coldstarts": count[keep], T: means[T][keep], **{c: means[c][keep] for c in COMP}}
    )


def _per_hour_frames(cols: Columns, raw: tuple | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cold starts and mean components per (region, hour); and (region, h, len) sorted."""
    r, h, m = raw if raw is not None else cols.per_time(3600.0)
    names = cols.groups["region"].names
    per_hour = pl.DataFrame({"coldstarts": m["count"], T: m[T], **{c: m[c] for c in COMP}})
    hourly = pl.DataFrame({"region": [names[i] for i in r], "h": h, "len": m["count"]})
    return per_hour, hourly


def correlations(cold: pl.DataFrame, seed: int = 0) -> dict:
    """Spearman matrices: per row (seeded sample of at most SPEARMAN_ROWS rows), per function and
    per hour (all rows)."""
    cols = Columns(cold, {"region": "region"})
    return _correlations_from(
        _row_spearman(cold, seed), _per_function_frame(cols), _per_hour_frames(cols)[0]
    )


def _row_spearman(cold: pl.DataFrame, seed: int) -> tuple[dict, dict]:
    rows = _row_sample(cold, SPEARMAN_ROWS, seed)
    n = cold.height
    return _spearman(rows), {"rows": rows.height, "of": n, "sampled": rows.height < n}


def _correlations_from(row: tuple[dict, dict], pf: pl.DataFrame, ph: pl.DataFrame) -> dict:
    return {
        "rows": row[0],
        "rows_sample": row[1],
        "per_function": _spearman(pf),
        "per_hour": _spearman(ph),
    }


def peak_to_trough(cold: pl.DataFrame) -> dict:
    """Peak/trough of cold starts per hour (complete hours only) and of the mean hour-of-day
    profile, per region."""
    return _peak_to_trough_from(_per_hour_frames(Columns(cold, {"region": "region"}))[1])


def _peak_to_trough_from(hourly: pl.DataFrame) -> dict:
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
            "median": _clean(med),
            "p99": _clean(p99),
            "x": x,
            "y": y,
        }
    return out


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


@dataclass
class Analysis:
    label: str
    stats: dict
    curves: dict  # arrays for figures (not in JSON)
    timings: dict = field(default_factory=dict)  # wall seconds per stage


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
    return grouped, _core(cols, srt, grouped)


def analyze_trace(tr: Trace, seed: int = 0) -> Analysis:
    """Every statistic of one trace (``Analysis.stats``) and the arrays its figures are drawn
    from (``Analysis.curves``). The independent parts run in threads (numpy and polars release
    the GIL); all of them are joined on return, so the caller may fork."""
    clock = _Clock()
    cold = tr.cold.filter(pl.col(T).is_not_null()) if tr.cold[T].null_count() else tr.cold
    st: dict = {"label": tr.label, "files": tr.files, "skipped_files": tr.skipped}
    curves: dict = {}
    x = cold[T].cast(pl.Float64).to_numpy()
    sorting = _InThread(SortedTotals, x)  # the one sort, beside polars
    lognormal = _InThread(_lognormal_part, sorting)  # the fit on the sorted values, likewise
    row_corr = _InThread(_row_spearman, cold, seed)  # ranks of the row sample, likewise

    groups = dict(GROUP_KEYS)
    if tr.runtime is not None:
        rt = tr.runtime.select(
            "funcID", "runtime", "trigger", "invocation", "triggerType-invocationType"
        ).unique("funcID")
        cold = cold.join(rt, on="funcID", how="left", maintain_order="left").with_columns(
            pl.col("runtime").fill_null("(not in runtime table)"),
            pl.col("trigger").fill_null("(not in runtime table)"),
        )
        groups |= {"runtime": "runtime", "trigger": "trigger"}
        st["runtime_table"] = {
            "functions": tr.runtime.height,
            "matched_coldstarts": int(cold["invocation"].is_not_null().sum()),
            "multi_trigger_functions": int((tr.runtime["n_triggers"] > 1).sum()),
        }

    span = float(cold["time"].max() - cold["time"].min()) if cold.height else 0.0
    bucket = _time_bucket(span)
    weibull = _InThread(_weibull_part, cold, seed)  # gaps, fit and KS beside the rest
    clock.lap("gaps")
    cols = Columns(cold, groups, x)
    second = _InThread(_grouped_core, sorting, cols)  # per-group order and core statistics
    clock.lap("group_codes")
    st["identity"] = R.check_identity(cold).to_dict()
    clock.lap("identity")
    hours = cols.per_time(3600.0)
    per_hour, hourly = _per_hour_frames(cols, hours)
    st["spearman"] = _correlations_from(row_corr.result(), _per_function_frame(cols), per_hour)
    clock.lap("spearman")
    st["peak_to_trough"] = _peak_to_trough_from(hourly)
    curves["hourly"] = {
        str(r): (p["h"].to_numpy(), p["len"].to_numpy())
        for (r,), p in hourly.partition_by("region", as_dict=True, maintain_order=True).items()
    }
    if bucket >= 3600 and bucket % 3600 == 0:  # days from the hours already summed
        b, ct = _coarser(hours[1], hours[2], int(bucket // 3600))
    else:
        _, b, ct = cols.per_time(bucket, by_region=False)
    curves["components_time"] = (bucket, {"bucket": b.astype(float), **{c: ct[c] for c in COMP}})
    sums = [float(cols.comp[c].sum()) for c in COMP] + [float(cols.x.sum())]
    row_share: list = [None] * len(COMP)
    if cols.n:
        buf = np.empty_like(cols.x)  # one buffer for the four ratios
        with np.errstate(invalid="ignore", divide="ignore"):
            row_share = [float(np.divide(cols.comp[c], cols.x, out=buf).mean()) for c in COMP]
    st["components"] = {
        "share_of_total_time": {
            c: _clean(sums[i] / sums[-1]) if sums[-1] else None for i, c in enumerate(COMP)
        },
        "mean_share_per_coldstart": {c: _clean(row_share[i]) for i, c in enumerate(COMP)},
        "mean_seconds": {c: _clean(sums[i] / max(cold.height, 1)) for i, c in enumerate(COMP)},
        "bucket_s": bucket,
    }
    clock.lap("components_hourly")
    st["fit_interarrival_weibull"], gap_curve = weibull.result()
    if gap_curve is not None:
        curves["gaps"] = gap_curve
    clock.lap("weibull_wait")

    if tr.requests is not None and tr.requests.height:
        pf = per_function_rates(cold, tr.requests)
        rates = pf.filter(pl.col("requests") > 0)["coldstart_rate"].to_numpy()
        both = pf.filter((pl.col("requests") > 0) & (pl.col("coldstarts") > 0))
        curves["per_function"] = {
            "requests": both["requests"].to_numpy(),
            "coldstarts": both["coldstarts"].to_numpy(),
        }
        st["per_function"] = {
            "functions_with_requests": int((pf["requests"] > 0).sum()),
            "functions_with_coldstarts": int((pf["coldstarts"] > 0).sum()),
            "coldstart_rate_median": _clean(np.median(rates)) if rates.size else None,
            "coldstart_rate_p90": _clean(np.quantile(rates, 0.9)) if rates.size else None,
            "overall_coldstart_rate": _clean(pf["coldstarts"].sum() / max(pf["requests"].sum(), 1)),
            "spearman_requests_vs_coldstarts": _clean(
                _spearman(both.select("requests", "coldstarts"))["requests"]["coldstarts"]
            )
            if both.height > 2
            else None,
        }
        if "cold" in tr.requests.columns:  # records written by the replay driver
            st["replay_cold_agreement"] = cold_agreement(tr.requests, cold)
        if same_clock(cold, tr.requests):
            u = utility_ratios(cold, tr.requests)["utility"].to_numpy()
            curves["utility"] = cdf_points(np.sort(u))
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
    return Analysis(tr.label, _clean(stats_), curves, clock.laps)


# --------------------------------------------------------------------------------------------
# figures (matplotlib Agg) and report

FIGURE_WORKERS = 2  # processes drawing figures (HEARTH_FIGURE_WORKERS=1: all in this process)
FIGURE_TIMEOUT_S = 300.0  # a stuck figure process is killed and its figures drawn here


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


def _plain(v: float, _pos=None) -> str:
    return f"{v:g}"


def _log_axis(ax, which: str = "x", lo: float | None = None, hi: float | None = None) -> None:
    """Log scale with plain tick labels (0.1, 1, 10; no mathtext) and no minor ticks, which
    are most of the drawing time; 1-2-5 ticks when the data span less than two decades."""
    from matplotlib import ticker

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    if lo is not None and hi is not None and lo > 0 and hi / lo < 100:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(_plain))
    axis.set_minor_locator(ticker.NullLocator())


def _title(ax, text: str) -> None:
    ax.set_title(text, fontsize=10, y=1.0)  # a fixed y skips matplotlib's title-overlap search


def _span(arrays) -> tuple[float | None, float | None]:
    xs = [a[a > 0] for a in arrays if a is not None and len(a)]
    xs = [a for a in xs if a.size]
    if not xs:
        return None, None
    return min(float(a.min()) for a in xs), max(float(a.max()) for a in xs)


class _Saver:
    def __init__(self, plt, out: Path):
        self.plt, self.out, self.made = plt, out, []

    def __call__(
        self,
        fig,
        name: str,
        caption: str,
        bottom: float = 0.62,
        left: float = 0.75,
        wspace: float = 0.12,
    ):
        # fixed margins (inches) instead of tight_layout: same look, a fraction of the cost
        w, h = fig.get_size_inches()
        fig.subplots_adjust(
            left=left / w, right=1 - 0.25 / w, bottom=bottom / h, top=1 - 0.72 / h, wspace=wspace
        )
        fig.savefig(self.out / name, pil_kwargs={"compress_level": 1})
        self.plt.close(fig)
        self.made.append((name, caption))


CDF_TITLES = {
    "region": "region",
    "cluster": "cluster",
    "runtime": "runtime",
    "trigger": "trigger type",
    "pool": "pool size (CPU millicores-memory MB)",
}


def _fig_cdf(grp: str):
    title = CDF_TITLES[grp]

    def draw(plt, analyses: list[Analysis], save: _Saver) -> None:
        fig, axes = _grid(plt, len(analyses))
        names = sorted({g for a in analyses for g in a.curves["cdf"].get(grp, {})})
        palette = plt.get_cmap("tab10")
        color = {g: palette(i % 10) for i, g in enumerate(names)}  # same group, same colour
        lo, hi = _span([v["x"] for a in analyses for v in a.curves["cdf"].get(grp, {}).values()])
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
            _log_axis(ax, "x", lo, hi)
            ax.set_xlabel("cold-start time (s, log scale)")
            _title(ax, a.label)
        axes[0].set_ylabel("CDF")
        fig.suptitle(f"Cold-start time by {title}")
        save(fig, f"cdf_{grp}.png", f"CDF of cold-start time per {title} (log x).")

    return draw


def _fig_components_time(plt, analyses: list[Analysis], save: _Saver) -> None:
    fig, axes = _grid(plt, len(analyses), sharey=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, a in zip(axes, analyses, strict=True):
        bucket, ct = a.curves["components_time"]
        unit, name = _time_unit(bucket)
        x = ct["bucket"] * bucket / unit
        ys = [ct[c] for c in COMP]
        ax.stackplot(
            x, *ys, labels=[c.replace("Cost", "") for c in COMP], colors=colors, alpha=0.85
        )
        top = float(np.nanmax(np.sum(ys, axis=0))) if len(x) else 1.0
        ax.set_ylim(0, top * 1.35)
        ax.set_xlabel(name)
        ax.set_ylabel("mean seconds per cold start")
        _title(ax, a.label)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle("Cold-start components over time (stacked means)")
    save(
        fig,
        "components_time.png",
        "Mean of each cold-start component per time bucket, stacked.",
        wspace=0.3,
    )


def _fig_component_shares(plt, analyses: list[Analysis], save: _Saver) -> None:
    n = len(analyses)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / n
    xs = np.arange(len(COMP))
    for i, a in enumerate(analyses):
        sh = a.stats["components"]["share_of_total_time"]
        ax.bar(xs + i * width, [sh[c] or 0 for c in COMP], width, label=a.label)
    ax.set_xticks(xs + width * (n - 1) / 2, [c.replace("Cost", "") for c in COMP])
    ax.set_ylabel("share of total cold-start time")
    ax.legend(fontsize=8)
    _title(ax, "Component shares")
    save(fig, "component_shares.png", "Share of total cold-start time spent in each component.")


def _fig_fit(
    plt,
    analyses: list[Analysis],
    save: _Saver,
    *,
    stat: str,
    curve: str,
    cdf,
    published: str,
    floor: float,
    xlabel: str,
    title: str,
    name: str,
    caption: str,
) -> None:
    """Empirical CDF (log x) with the fitted and the published distribution, per trace;
    `cdf(grid, params)` evaluates the distribution from its stats entry."""
    fig, axes = _grid(plt, len(analyses))
    for ax, a in zip(axes, analyses, strict=True):
        if curve not in a.curves:
            ax.text(
                0.5, 0.5, a.stats[stat]["error"], ha="center", transform=ax.transAxes, wrap=True
            )
            continue
        x, y = a.curves[curve]
        f = a.stats[stat]
        ax.step(x, y, where="post", label="empirical", color="k")
        grid = np.logspace(np.log10(max(x.min(), floor)), np.log10(x.max()), 300)
        ax.plot(
            grid,
            cdf(grid, f),
            "--",
            label=f"fit: mean {f['mean']:.2f}s sd {f['sd']:.2f}s (KS {f['ks_vs_fit']:.3f})",
        )
        ax.plot(
            grid,
            cdf(grid, f["published"]),
            ":",
            label=f"published: {published} (KS {f['ks_vs_published']:.3f})",
        )
        _log_axis(ax, "x", grid[0], grid[-1])
        ax.set_xlabel(xlabel)
        _title(ax, a.label)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("CDF")
    fig.suptitle(title)
    save(fig, name, caption)


def _fig_fit_coldstart(plt, analyses: list[Analysis], save: _Saver) -> None:
    _fig_fit(
        plt,
        analyses,
        save,
        stat="fit_coldstart_lognormal",
        curve="total",
        cdf=lambda g, p: _lognorm_cdf(g, p["mu"], p["sigma"]),
        published="mean 3.24s sd 7.10s",
        floor=1e-4,
        xlabel="cold-start time (s, log scale)",
        title="Cold-start time: LogNormal fit",
        name="fit_coldstart.png",
        caption="Empirical CDF of cold-start time with the fitted and the published LogNormal.",
    )


def _fig_fit_interarrival(plt, analyses: list[Analysis], save: _Saver) -> None:
    _fig_fit(
        plt,
        analyses,
        save,
        stat="fit_interarrival_weibull",
        curve="gaps",
        cdf=lambda g, p: _weibull_cdf(g, p["shape"], p["scale"]),
        published="mean 1.25s sd 3.66s",
        floor=1e-6,
        xlabel="time between cold starts (s, log scale)",
        title="Time between cold starts: Weibull fit",
        name="fit_interarrival.png",
        caption="Empirical CDF of inter-cold-start times with fitted and published Weibull.",
    )


def _fig_spearman(plt, analyses: list[Analysis], save: _Saver) -> None:
    fig, axes = _grid(plt, len(analyses), w=5.0, h=4.4, sharey=False)
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
        _title(ax, a.label)
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


def _fig_per_hour(plt, analyses: list[Analysis], save: _Saver) -> None:
    fig, axes = _grid(plt, len(analyses), w=6.0, sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        for region, (h, counts) in a.curves["hourly"].items():
            ax.plot(h / 24, counts, lw=0.8, label=region)
        ax.set_xlabel("day")
        ax.set_ylabel("cold starts per hour")
        _title(ax, a.label)
        ax.legend(fontsize=8)
    fig.suptitle("Cold starts per hour (peak-to-trough)")
    save(fig, "coldstarts_per_hour.png", "Cold starts per hour per region.", wspace=0.3)


def _fig_requests_vs_coldstarts(plt, analyses: list[Analysis], save: _Saver) -> None:
    fig, axes = _grid(plt, len(analyses), sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        pf = a.curves.get("per_function")
        if pf is None:
            ax.text(0.5, 0.5, "no per-request rows given", ha="center", transform=ax.transAxes)
            continue
        ax.scatter(pf["requests"], pf["coldstarts"], s=6, alpha=0.5)
        top = float(pf["requests"].max()) if pf["requests"].size else 1.0
        lim = [1, max(top, 10)]
        ax.plot(lim, lim, "k:", lw=0.8, label="every request cold")
        _log_axis(ax, "x", *lim)
        _log_axis(ax, "y", *lim)
        ax.set_xlabel("requests per function")
        ax.set_ylabel("cold starts per function")
        _title(ax, a.label)
        ax.legend(fontsize=8)
    fig.suptitle("Requests vs cold starts per function")
    save(
        fig,
        "requests_vs_coldstarts.png",
        "Requests vs cold starts per function (log-log).",
        wspace=0.3,
    )


def _fig_pod_utility(plt, analyses: list[Analysis], save: _Saver) -> None:
    fig, axes = _grid(plt, len(analyses))
    lo, hi = _span(
        [np.maximum(a.curves["utility"][0], 1e-3) for a in analyses if "utility" in a.curves]
    )
    for ax, a in zip(axes, analyses, strict=True):
        if "utility" not in a.curves:
            continue
        x, y = a.curves["utility"]
        ax.step(np.maximum(x, 1e-3), y, where="post")
        ax.axvline(1.0, color="r", ls=":", lw=1)
        fb = a.stats["pod_utility"]["fraction_below_1"]
        _log_axis(ax, "x", lo, hi)
        ax.set_xlabel("pod utility ratio (log scale)")
        _title(ax, f"{a.label}: {fb:.1%} below 1" if fb is not None else a.label)
    axes[0].set_ylabel("CDF")
    fig.suptitle("Pod utility ratio (useful lifetime / cold-start time)")
    save(fig, "pod_utility.png", "CDF of pod utility ratio; red line at 1.")


class FigureJob(NamedTuple):
    cost: float  # relative drawing cost (about CPU ms / 50)
    draw: Callable  # draw(plt, analyses, save)


def figure_jobs(analyses: list[Analysis]) -> list[FigureJob]:
    """The figures the analyses call for, in report order (costs: CPU ms / 50, measured)."""
    jobs = [
        FigureJob(1.2, _fig_cdf(g))
        for g in CDF_TITLES
        if any(g in a.curves["cdf"] for a in analyses)
    ]
    jobs += [
        FigureJob(1.1, _fig_components_time),
        FigureJob(0.9, _fig_component_shares),
        FigureJob(1.2, _fig_fit_coldstart),
    ]
    if any("gaps" in a.curves for a in analyses):
        jobs.append(FigureJob(1.2, _fig_fit_interarrival))
    jobs += [FigureJob(1.7, _fig_spearman), FigureJob(1.0, _fig_per_hour)]
    if any("per_function" in a.curves for a in analyses):
        jobs += [FigureJob(1.5, _fig_requests_vs_coldstarts), FigureJob(1.0, _fig_pod_utility)]
    return jobs


def _draw(jobs: list[FigureJob], analyses: list[Analysis], out: Path) -> list[list]:
    """Draw ``jobs`` here; per job, the (file, caption) pairs written."""
    plt = _plt()
    res = []
    for job in jobs:
        save = _Saver(plt, out)
        job.draw(plt, analyses, save)
        res.append(save.made)
    return res


def _split(jobs: list[FigureJob]) -> tuple[list[int], list[int]]:
    """Two job sets of about equal cost (largest first, each to the lighter set)."""
    a: list[int] = []
    b: list[int] = []
    ca, cb = 0.0, 0.0
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i].cost):
        if ca <= cb:
            a.append(i)
            ca += jobs[i].cost
        else:
            b.append(i)
            cb += jobs[i].cost
    return sorted(a), sorted(b)


def _runnable_elsewhere() -> float:
    """Tasks runnable right now in other processes: all runnable tasks (``/proc/loadavg``)
    minus this process's own running threads (``/proc/self/task``; e.g. polars workers that
    have not gone to sleep yet); else the 1-minute load average. The instantaneous count is
    used because a load average also counts this process's own last minute (a benchmark
    that just ran pandas looks busy)."""
    try:
        with open("/proc/loadavg") as fh:
            runnable = int(fh.read().split()[3].split("/")[0])
        mine = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as fh:
                    mine += fh.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
        return max(0, runnable - max(mine, 1))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _figure_workers() -> int:
    """HEARTH_FIGURE_WORKERS if set; else FIGURE_WORKERS when a core is idle (fewer tasks
    runnable elsewhere than cores), else 1: on a saturated machine a second process only adds
    the cost of the fork."""
    env = os.environ.get("HEARTH_FIGURE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return FIGURE_WORKERS if cpus >= 2 and _runnable_elsewhere() < cpus else 1


def figures(
    analyses: list[Analysis], out: Path, workers: int | None = None
) -> list[tuple[str, str]]:
    """Write PNGs into ``out``; returns (file name, caption) in report order. One panel per
    trace.

    With ``workers`` >= 2 (default: see :func:`_figure_workers`) and ``os.fork`` available,
    the figures are split in two sets of about equal cost: a forked child (see
    :class:`_FigureChild`) draws one set while this process draws the other."""
    out = Path(out)
    jobs = figure_jobs(analyses)
    workers = _figure_workers() if workers is None else workers
    if workers < 2 or len(jobs) < 2 or not hasattr(os, "fork"):
        return [m for made in _draw(jobs, analyses, out) for m in made]
    mine, theirs = _split(jobs)
    child = _FigureChild([jobs[i] for i in theirs], analyses, out)
    return _gather(jobs, analyses, out, mine, child)


def _gather(
    jobs: list[FigureJob], analyses: list[Analysis], out: Path, mine: list[int], child
) -> list[tuple[str, str]]:
    """Draw ``mine`` here, then take the rest from ``child`` (drawn here if it failed)."""
    theirs = [i for i in range(len(jobs)) if i not in mine]
    try:
        results = dict(zip(mine, _draw([jobs[i] for i in mine], analyses, out), strict=True))
    except BaseException:
        if child is not None:
            child.kill()
        raise
    done = child.result() if child is not None else None
    if done is None:  # no child, or it failed: draw its figures here
        done = _draw([jobs[i] for i in theirs], analyses, out)
    results.update(zip(theirs, done, strict=True))
    return [m for i in range(len(jobs)) for m in results[i]]


class _FigureChild:
    """A forked process drawing ``jobs``. It touches only matplotlib and the numpy arrays in
    ``Analysis.curves`` (never polars, whose thread pool does not survive a fork), reports the
    files it wrote through a pipe and leaves with ``os._exit``. ``result()`` is None if it
    failed, hung (``FIGURE_TIMEOUT_S``) or died: its figures are then drawn by the caller,
    so figures are never left out. Fork only when no thread of this process is working."""

    def __init__(self, jobs: list[FigureJob], analyses: list[Analysis], out: Path):
        import gc

        _plt()  # imported before the fork: the child inherits it
        self.r, w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork + threads
            self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child process (its coverage is not collected)
            code = 1
            try:
                os.close(self.r)
                gc.disable()  # short-lived; never runs finalizers of the parent's objects
                payload = json.dumps({"made": _draw(jobs, analyses, out)})
                code = 0
            except BaseException:  # noqa: BLE001 - reported to the parent
                payload = json.dumps({"error": traceback.format_exc()})
            try:
                data = payload.encode()
                while data:
                    data = data[os.write(w, data) :]
                os.close(w)  # the parent reads EOF now, not after this big process is torn down
            finally:
                os._exit(code)
        os.close(w)

    def kill(self) -> None:
        import signal

        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.r)

    def result(self) -> list[list] | None:
        import signal

        chunks = []
        deadline = time.monotonic() + FIGURE_TIMEOUT_S
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.r], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)  # stuck: draw its figures here
                    break
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except BaseException:
            self.kill()
            raise
        os.close(self.r)
        try:
            msg = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            msg = {}
        if "made" in msg:  # complete, so the child is exiting: reap it without waiting here
            if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                threading.Thread(target=os.waitpid, args=(self.pid, 0), daemon=True).start()
            return [[tuple(m) for m in made] for made in msg["made"]]
        os.waitpid(self.pid, 0)  # it failed, hung (killed above) or died
        if "error" in msg:
            warnings.warn(f"figure process failed, drawing here: {msg['error']}", stacklevel=3)
        return None


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
    importing = _InThread(_plt)  # matplotlib loads while polars reads the files
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
    workers = _figure_workers() if hasattr(os, "fork") else 1
    figs = figures(analyses, outd, workers)
    timings["figures"] = round(time.perf_counter() - t, 4)
    timings["figure_processes"] = min(workers, 2) if len(figure_jobs(analyses)) > 1 else 1
    doc = {"traces": [a.stats for a in analyses], "figures": [f for f, _ in figs]}
    (outd / "stats.json").write_text(json.dumps(_clean(doc), indent=1, default=str) + "\n")
    (outd / "report.html").write_text(render_html(analyses, figs))
    doc["timings_s"] = timings  # not in stats.json: timings are not statistics
    return doc
