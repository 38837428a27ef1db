"""Trace -> invocation schedule (pure, seeded, vectorised).

A schedule is a table of invocations: ``t`` (seconds from replay start), ``function``,
``duration_ms``, ``memory_mb``, ``phase`` (warmup|main), ``trace_t`` (time in the trace) and
``seq``. Built from exact timestamps (Azure 2021, Huawei per-request or cold-start rows) or from
per-minute/per-second counts spread inside each bin (InVitro's exponential / uniform /
equidistant with a random shift). Then: function sampling to a target load, a time window, idle
compression, a speed factor, per-invocation durations/memory, a warm-up phase.

Same inputs + same :class:`ScheduleParams` (seed included) -> the identical schedule.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from .schedule_file import COLUMNS, is_schedule, read_frame
from .sources import Source, load_source

__all__ = [  # Source and load_source were defined here: importers keep them
    "COLUMNS",
    "SPREADS",
    "Schedule",
    "ScheduleParams",
    "Source",
    "build",
    "build_from_paths",
    "compress_idle",
    "constant_rate",
    "is_schedule",
    "load_source",
    "per_minute",
    "sample_functions",
    "sample_percentiles",
    "shard",
    "spread_counts",
    "warmup_rows",
]

SPREADS = ("exponential", "uniform", "equidistant")


@dataclass
class ScheduleParams:
    seed: int = 0
    spread: str = "exponential"  # for per-minute/per-second counts
    speed: float = 1.0  # >1 replays faster than the trace
    start_s: float | None = None  # window start, trace seconds after the trace's first bin/arrival
    duration_s: float | None = None  # window length in trace seconds
    compress_idle_s: float | None = None  # shorten idle gaps longer than this (trace seconds)
    target_rps: float | None = None  # sample functions to about this rate (replay time)
    sample_candidates: int = 64
    warmup_s: float = 0.0  # warm-up phase length (replay seconds), Little's law per function
    default_duration_ms: float = 100.0
    default_memory_mb: float = 128.0
    max_invocations: int | None = None

    def validate(self) -> None:
        if self.spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, not {self.spread!r}")
        if not self.speed > 0:
            raise ValueError(f"speed must be > 0, got {self.speed}")
        for name in ("duration_s", "compress_idle_s", "target_rps"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s}")


@dataclass
class Schedule:
    df: pl.DataFrame
    meta: dict

    @property
    def invocations(self) -> int:
        return self.df.height

    def arrivals(self, phase: str | None = "main") -> dict[str, np.ndarray]:
        """Per-function sorted arrival times (what the keep-alive simulator takes)."""
        d = self.df if phase is None else self.df.filter(pl.col("phase") == phase)
        return {
            str(f): np.sort(part["t"].to_numpy())
            for (f,), part in d.partition_by("function", as_dict=True).items()
        }

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.name.endswith((".parquet", ".pq")):
            self.df.write_parquet(p, metadata={"hearth.schedule": json.dumps(self.meta)})
        elif p.name.endswith(".csv"):
            self.df.write_csv(p)
            p.with_name(p.name + ".meta.json").write_text(json.dumps(self.meta, indent=1) + "\n")
        else:
            raise ValueError(f"{p}: schedule files are .parquet or .csv")
        return p

    @classmethod
    def read(cls, path: str | Path) -> Schedule:
        """A schedule written by `write`; a value of the wrong type or a missing one is a
        `TraceFormatError` naming its line and column (a replay would fail on it midway)."""
        return cls(*read_frame(path))


# --------------------------------------------------------------------------------------------
# pure steps


def spread_counts(counts: pl.DataFrame, method: str, rng: np.random.Generator) -> pl.DataFrame:
    """Expand (function, t0, width, count) bins into arrival times inside each bin.

    uniform: iid uniform in the bin. equidistant: count evenly spaced arrivals shifted by one
    random offset in [0, width/count) per bin. exponential: Exp(1) gaps rescaled so the count
    gaps plus the wrap-around gap fill the bin, rotated by a random shift (InVitro's scheme)."""
    n = counts["count"].to_numpy().astype(np.int64)
    total = int(n.sum())
    bins = np.repeat(np.arange(counts.height), n)
    t0 = counts["t0"].to_numpy()[bins]
    w = counts["width"].to_numpy()[bins]
    start = np.cumsum(n) - n  # first arrival of each bin (empty when there are no bins)
    k = np.arange(total) - np.repeat(start, n)  # position within bin
    nn = n[bins]
    if method == "uniform":
        off = rng.random(total) * w
    elif method == "equidistant":
        shift = rng.random(counts.height)[bins] * (w / nn)
        off = k * (w / nn) + shift
    elif method == "exponential":
        gaps = rng.exponential(1.0, total)
        wrap = rng.exponential(1.0, counts.height)
        cs = np.cumsum(gaps)
        within = cs - np.repeat(np.r_[0.0, cs][start], n)  # cumulative gaps inside the bin
        last = np.add.reduceat(gaps, start[n > 0]) if total else np.array([])
        denom = np.zeros(counts.height)
        denom[n > 0] = last
        denom = denom + wrap
        shift = rng.random(counts.height)
        off = ((within / denom[bins]) + shift[bins]) % 1.0 * w
    else:
        raise ValueError(f"unknown spread {method!r}")
    return pl.DataFrame({"function": counts["function"].gather(bins), "t": t0 + off})


def per_minute(exact: pl.DataFrame | None, counts: pl.DataFrame | None) -> pl.DataFrame:
    """(function, minute, count) profile of a source (for sampling)."""
    if exact is not None:
        return exact.group_by("function", (pl.col("t") // 60).cast(pl.Int64).alias("minute")).len(
            "count"
        )
    assert counts is not None
    return counts.group_by("function", (pl.col("t0") // 60).cast(pl.Int64).alias("minute")).agg(
        pl.col("count").sum()
    )


def sample_functions(
    profile: pl.DataFrame,
    target_rate: float,
    rng: np.random.Generator,
    candidates: int = 64,
    span_s: float | None = None,
) -> tuple[list[str], dict]:
    """Choose functions whose summed rate is close to ``target_rate`` (per trace second) while the
    aggregate per-minute shape stays close to the full trace's.

    InVitro-style: draw ``candidates`` random subsets (random order, prefix closest to the target
    rate), score each by the Wasserstein-1 distance between its normalised per-minute invocation
    profile and the full trace's (minute index as support, counts as weights) plus the W1 distance
    between the subset's and the trace's per-function log-rate distributions; keep the best."""
    minutes = profile["minute"]
    m0, m1 = int(minutes.min()), int(minutes.max())
    if span_s is None:  # the profile's whole minutes
        span_s = (m1 - m0 + 1) * 60.0
    per_f = profile.group_by("function").agg(pl.col("count").sum().alias("n")).sort("function")
    fns = per_f["function"].to_list()
    rate = per_f["n"].to_numpy() / span_s
    total_rate = float(rate.sum())
    info = {"trace_rate": total_rate, "target_rate": target_rate, "functions_total": len(fns)}
    if target_rate >= total_rate:
        info |= {
            "sampled_rate": total_rate,
            "functions": len(fns),
            "note": "target >= trace rate: all functions",
        }
        return fns, info
    idx_of = {f: i for i, f in enumerate(fns)}
    fi = np.array([idx_of[f] for f in profile["function"].to_list()])
    mi = profile["minute"].to_numpy() - m0
    cnt = profile["count"].to_numpy().astype(float)
    mat_full = np.bincount(mi, weights=cnt, minlength=m1 - m0 + 1)
    support = np.arange(m1 - m0 + 1, dtype=float)
    logr = np.log(rate)
    best = None
    for _ in range(max(1, candidates)):
        order = rng.permutation(len(fns))
        cum = np.cumsum(rate[order])
        j = int(np.searchsorted(cum, target_rate))
        if j < len(cum) and j > 0 and abs(cum[j - 1] - target_rate) < abs(cum[j] - target_rate):
            j -= 1
        chosen = order[: min(j + 1, len(fns))]
        mask = np.zeros(len(fns), bool)
        mask[chosen] = True
        sub = np.bincount(mi[mask[fi]], weights=cnt[mask[fi]], minlength=support.size)
        if sub.sum() == 0:
            continue
        w_shape = stats.wasserstein_distance(support, support, mat_full, sub) / max(support.size, 1)
        w_rates = stats.wasserstein_distance(logr, logr[mask]) / max(np.ptp(logr), 1e-9)
        rate_err = abs(rate[mask].sum() - target_rate) / target_rate
        score = w_shape + w_rates + rate_err
        if best is None or score < best[0]:
            best = (score, mask.copy(), w_shape, w_rates)
    assert best is not None
    _, mask, w_shape, w_rates = best
    chosen_f = [fns[i] for i in np.flatnonzero(mask)]
    info |= {
        "sampled_rate": float(rate[mask].sum()),
        "functions": len(chosen_f),
        "wasserstein_shape": float(w_shape),
        "wasserstein_log_rate": float(w_rates),
    }
    return chosen_f, info


def compress_idle(t: np.ndarray, max_gap: float) -> np.ndarray:
    """Shorten every gap between consecutive arrivals to at most ``max_gap`` (t sorted)."""
    if t.size == 0:
        return t
    d = np.minimum(np.diff(t), max_gap)
    return np.r_[t[0], t[0] + np.cumsum(d)]


def sample_percentiles(
    functions: np.ndarray, table: pl.DataFrame, rng: np.random.Generator, default: float
) -> np.ndarray:
    """Per invocation, draw from its function's piecewise-linear quantile function."""
    out = np.full(functions.size, default, dtype=float)
    if table is None or table.height == 0:
        return out
    groups = table.drop_nulls().sort("q").partition_by("function", as_dict=True)
    order = np.argsort(functions, kind="stable")
    fs = functions[order]
    uniq, starts = np.unique(fs, return_index=True)
    ends = np.r_[starts[1:], fs.size]
    u = rng.random(functions.size) * 100.0
    for f, a, b in zip(uniq, starts, ends, strict=True):
        g = groups.get((f,))
        if g is None or g.height == 0:
            continue
        q = g["q"].to_numpy()
        v = np.maximum.accumulate(g["value"].to_numpy())
        idx = order[a:b]
        lo, hi = q.min(), q.max()
        out[idx] = np.interp(np.clip(u[idx], lo, hi), q, v)
    return out


def warmup_rows(main: pl.DataFrame, warmup_s: float, rng: np.random.Generator) -> pl.DataFrame:
    """Little's law: each function needs L = lambda * W instances in steady state (lambda its
    mean rate in the first minute of the main phase, W its mean duration). Send ceil(L)
    overlapping invocations per function during the first half of the warm-up, so that many
    instances are up when the main phase starts."""
    first = main.filter(pl.col("t") < main["t"].min() + 60.0)
    per = (
        first.group_by("function")
        .agg(
            (pl.len() / 60.0).alias("lam"),
            (pl.col("duration_ms").mean() / 1000).alias("w"),
            pl.col("duration_ms").mean().alias("d"),
            pl.col("memory_mb").mean().alias("m"),
        )
        .sort("function")
    )
    n = np.maximum(1, np.ceil(per["lam"].to_numpy() * per["w"].to_numpy())).astype(int)
    f_idx = np.repeat(np.arange(per.height), n)
    start = rng.random(per.height) * warmup_s / 2
    k = np.arange(f_idx.size) - np.repeat(np.r_[0, np.cumsum(n)[:-1]], n)
    return pl.DataFrame(
        {
            "t": start[f_idx] + k * 0.001,
            "function": per["function"].to_numpy()[f_idx],
            "duration_ms": per["d"].to_numpy()[f_idx],
            "memory_mb": per["m"].to_numpy()[f_idx],
            "phase": "warmup",
            "trace_t": np.full(f_idx.size, np.nan),
        }
    )


def build(source: Source, p: ScheduleParams) -> Schedule:
    """The pipeline (pure given ``source``): window, function sampling, arrivals, the main
    phase's times and resources, the warm-up phase. Draws from one seeded generator, in that
    order."""
    p.validate()
    rng = np.random.default_rng(p.seed)
    meta: dict = {"params": asdict(p), "source_kind": source.kind}
    exact, counts = source.exact, source.counts
    tmin = float(exact["t"].min()) if exact is not None else float(counts["t0"].min())

    lo = tmin + (p.start_s or 0.0)
    hi = lo + p.duration_s if p.duration_s is not None else math.inf
    # window first, so sampling sees the load of the part that is replayed
    if counts is not None:
        counts = counts.filter((pl.col("t0") + pl.col("width") > lo) & (pl.col("t0") < hi))
    else:
        exact = exact.filter((pl.col("t") >= lo) & (pl.col("t") < hi))
    if p.target_rps is not None and (exact.height if exact is not None else counts.height):
        exact, counts, meta["sampling"] = _sample(exact, counts, p, rng)
    arr = _arrivals(exact, counts, p.spread, lo, hi, rng)
    main = _main_phase(arr, lo, source, p, rng)
    parts = [main]
    if p.warmup_s > 0 and main.height:
        parts = [warmup_rows(main, p.warmup_s, rng), main.with_columns(pl.col("t") + p.warmup_s)]
        meta["warmup_invocations"] = parts[0].height
    df = pl.concat(parts, how="vertical_relaxed").sort("t", maintain_order=True)
    df = df.with_row_index("seq").with_columns(pl.col("seq").cast(pl.Int64)).select(COLUMNS)
    meta["invocations"] = df.height
    meta["duration_s"] = float(df["t"].max()) if df.height else 0.0
    meta["functions"] = int(df["function"].n_unique())
    return Schedule(df, meta)


def _sample(
    exact: pl.DataFrame | None,
    counts: pl.DataFrame | None,
    p: ScheduleParams,
    rng: np.random.Generator,
) -> tuple[pl.DataFrame | None, pl.DataFrame | None, dict]:
    """The windowed source cut to the functions ``sample_functions`` keeps for ``target_rps``,
    and its report."""
    prof = per_minute(exact, counts)
    span = p.duration_s
    if span is None:
        if exact is not None:
            span = max(float(exact["t"].max() - exact["t"].min()), 60.0)
        else:
            span = float((counts["t0"] + counts["width"]).max() - counts["t0"].min())
    keep, info = sample_functions(
        prof, p.target_rps / p.speed, rng, p.sample_candidates, span_s=span
    )
    ks = pl.DataFrame({"function": keep}, schema={"function": pl.String})
    if exact is not None:
        exact = exact.join(ks, on="function", how="semi")
    else:
        counts = counts.join(ks, on="function", how="semi")
    return exact, counts, info


def _arrivals(
    exact: pl.DataFrame | None,
    counts: pl.DataFrame | None,
    spread: str,
    lo: float,
    hi: float,
    rng: np.random.Generator,
) -> pl.DataFrame:
    """(function, t, duration_ms, memory_mb) in [lo, hi), sorted by time then function; counts
    are spread inside their bins; resources the source lacks are null."""
    if counts is not None:
        arr = spread_counts(counts, spread, rng).filter((pl.col("t") >= lo) & (pl.col("t") < hi))
        arr = arr.with_columns(
            pl.lit(None, dtype=pl.Float64).alias("duration_ms"),
            pl.lit(None, dtype=pl.Float64).alias("memory_mb"),
        )
    else:
        arr = exact.filter((pl.col("t") >= lo) & (pl.col("t") < hi))
        for c in ("duration_ms", "memory_mb"):
            if c not in arr.columns:
                arr = arr.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
        arr = arr.select("function", "t", "duration_ms", "memory_mb")
    return arr.sort(["t", "function"])


def _main_phase(
    arr: pl.DataFrame, lo: float, source: Source, p: ScheduleParams, rng: np.random.Generator
) -> pl.DataFrame:
    """Replay times (from ``lo``, idle gaps compressed, sped up) and every invocation's duration
    and memory (missing ones drawn from the source's percentiles, else the defaults)."""
    trace_t = arr["t"].to_numpy()
    t = trace_t - lo
    if p.compress_idle_s is not None:
        t = compress_idle(t, p.compress_idle_s)
    t = t / p.speed

    fn = arr["function"].to_numpy()
    dur = arr["duration_ms"].to_numpy()
    mem = arr["memory_mb"].to_numpy()
    if np.isnan(dur).any() or source.durations is not None:
        drawn = sample_percentiles(fn, source.durations, rng, p.default_duration_ms)
        dur = np.where(np.isnan(dur), drawn, dur)
    if np.isnan(mem).any() or source.memory is not None:
        drawn = sample_percentiles(fn, source.memory, rng, p.default_memory_mb)
        mem = np.where(np.isnan(mem), drawn, mem)
    main = pl.DataFrame(
        {
            "t": t,
            "function": fn,
            "duration_ms": dur,
            "memory_mb": mem,
            "phase": "main",
            "trace_t": trace_t,
        },
        schema_overrides={"function": pl.String},
    )
    if p.max_invocations is not None:
        main = main.head(p.max_invocations)
    return main


def build_from_paths(paths: list[str | Path], p: ScheduleParams) -> Schedule:
    src = load_source(paths)
    s = build(src, p)
    s.meta["source_paths"] = [str(x) for x in paths]
    return s


def constant_rate(
    rate: float, duration_s: float, function: str = "noop", duration_ms: float = 0.0
) -> Schedule:
    """A fixed-rate equidistant schedule (benchmarks, smoke tests)."""
    n = int(round(rate * duration_s))
    t = np.arange(n) / rate
    df = pl.DataFrame(
        {
            "seq": np.arange(n, dtype=np.int64),
            "t": t,
            "function": [function] * n,
            "duration_ms": np.full(n, duration_ms),
            "memory_mb": np.zeros(n),
            "phase": ["main"] * n,
            "trace_t": t,
        }
    )
    return Schedule(df, {"constant_rate": rate, "duration_s": duration_s, "invocations": n})


def shard(s: Schedule, n: int, by: str = "function") -> list[Schedule]:
    """Cut a schedule into ``n`` shards: by function (hash of the name, so one function's
    invocations stay in one replay instance) or by time window (contiguous slices)."""
    if n <= 1:
        return [s]
    if by == "function":
        h = s.df["function"].hash(seed=0) % n
        parts = [s.df.filter(h == i) for i in range(n)]
    elif by == "time":
        t0, t1 = float(s.df["t"].min()), float(s.df["t"].max()) + 1e-9
        edges = np.linspace(t0, t1, n + 1)
        parts = [
            s.df.filter((pl.col("t") >= edges[i]) & (pl.col("t") < edges[i + 1])) for i in range(n)
        ]
    else:
        raise ValueError(f"shard by 'function' or 'time', not {by!r}")
    return [
        Schedule(p, s.meta | {"shard": i, "shards": n, "shard_by": by}) for i, p in enumerate(parts)
    ]
