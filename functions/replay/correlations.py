"""Spearman rank correlations of the cold-start components: per row (a seeded sample), per
function and per hour."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
import polars as pl

from .trace_columns import COMP, Columns, T, per_function_frame, per_hour_frames
from .trace_stats import json_safe, sort_order

SPEARMAN_ROWS = 400_000  # per-row Spearman matrix: seeded sample of at most this many rows


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


def spearman(df: pl.DataFrame) -> dict:
    if df.height < 3:
        return {}
    m = _correlation(np.vstack([average_ranks(df[c]) for c in df.columns]))
    cols = df.columns
    return {a: {b: json_safe(m[i, j]) for j, b in enumerate(cols)} for i, a in enumerate(cols)}


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


def correlations(cold: pl.DataFrame, seed: int = 0) -> dict:
    """Spearman matrices: per row (seeded sample of at most SPEARMAN_ROWS rows), per function and
    per hour (all rows)."""
    cols = Columns(cold, {"region": "region"})
    return correlations_from(
        row_spearman(cold, seed), per_function_frame(cols), per_hour_frames(cols)[0]
    )


def row_spearman(cold: pl.DataFrame, seed: int) -> tuple[dict, dict]:
    rows = _row_sample(cold, SPEARMAN_ROWS, seed)
    n = cold.height
    return spearman(rows), {"rows": rows.height, "of": n, "sampled": rows.height < n}


def correlations_from(row: tuple[dict, dict], pf: pl.DataFrame, ph: pl.DataFrame) -> dict:
    return {
        "rows": row[0],
        "rows_sample": row[1],
        "per_function": spearman(pf),
        "per_hour": spearman(ph),
    }
