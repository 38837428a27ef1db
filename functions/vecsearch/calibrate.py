"""Recall target instead of knobs: measure, at build time, the recall@k the visit plan reaches at
growing coverage on held-out samples of the base rows, and keep the curve in the index.

A sampled row is searched as a query with k + 1 results; the row itself is dropped from both the
answer and the brute-force truth, so it stands for an unseen query from the same distribution.
The effort for a target is then read off the curve (`effort_for`): the smallest measured coverage
whose recall reached target + MARGIN (the margin absorbs the sample's noise, about +-0.005 at
200 queries x 10 neighbours, and the gap between base rows and real held-out queries)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .index import VecIndex

GRID = (
    0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.045, 0.065, 0.09, 0.13, 0.19,
    0.27, 0.4, 0.6, 1.0,
)  # fmt: skip
MARGIN = 0.01
DEFAULT_COVERAGE = 0.08  # an index built without calibration
K = 10


def effort_for(curve: list[list[float]], target: float, margin: float = MARGIN) -> float:
    """Smallest coverage whose measured recall >= target + margin; past the curve, everything.
    Pure: `curve` is [[coverage, recall], ...] by increasing coverage."""
    for cov, rec in curve:
        if rec >= min(1.0, target + margin):
            return float(cov)
    return 1.0


def index_effort(index: VecIndex, target: float | None) -> float:
    """The coverage a search uses when the caller gives none: from the index's calibration (for
    `target`, else the target it was built for), or DEFAULT_COVERAGE when it has none."""
    cal: dict[str, Any] | None = index.build_info.get("calibration")
    if not cal:
        return DEFAULT_COVERAGE
    return effort_for(cal["curve"], target or float(cal["target"]))


def _truth(index: VecIndex, pos: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k external ids of raw rows `pos` among the live rows, each row excluded."""
    raw = np.asarray(index.raw)
    q = raw[pos].astype(np.float32)
    best = np.full((len(q), k), np.inf, np.float32)
    bid = np.full((len(q), k), -1, np.int64)
    ip = index.metric == "ip"
    for s in range(0, len(live), 65536):
        rows = live[s : s + 65536]
        b = raw[rows]
        g = q @ b.T
        d = -g if ip else (b * b).sum(1)[None, :] - 2 * g  # + |q|^2: the same for every row
        d[rows[None, :] == pos[:, None]] = np.inf
        dd = np.concatenate([best, d], axis=1)
        ii = np.concatenate([bid, np.broadcast_to(rows, d.shape)], axis=1)
        o = np.argsort(dd, axis=1, kind="stable")[:, :k]
        best, bid = np.take_along_axis(dd, o, 1), np.take_along_axis(ii, o, 1)
    return np.where(bid >= 0, np.asarray(index.ids)[np.maximum(bid, 0)], -1)


def measure(index: VecIndex, n_queries: int = 200, k: int = K, seed: int = 0, stop_at: float = 1.0):
    """Recall@k of the sampled rows at each GRID coverage (until recall >= stop_at)."""
    from . import query

    alive = np.unpackbits(index.alive.view(np.uint8), bitorder="little")[: index.n_rows]
    live = np.nonzero(alive)[0]
    rng = np.random.default_rng(seed + 1)
    pos = np.sort(rng.choice(live, min(n_queries, len(live)), replace=False))
    truth = _truth(index, pos, live, k)
    own = np.asarray(index.ids)[pos]
    qs = np.asarray(index.raw)[pos]
    metric = "cosine" if index.metric == "cosine" else index.metric
    curve = []
    for cov in GRID:
        res = query.search(
            index, qs, k + 1, metric=metric, params=query.SearchParams(coverage=cov, threads=1)
        )
        hit = tot = 0
        for qi in range(len(pos)):
            got = [int(i) for i in res.ids[qi] if i >= 0 and i != own[qi]][:k]
            t = set(int(i) for i in truth[qi] if i >= 0)
            hit += len(t & set(got))
            tot += len(t)
        rec = hit / tot if tot else 1.0
        curve.append([cov, round(rec, 4)])
        if rec >= stop_at:
            break
    return curve


def calibrate(
    index: VecIndex, target: float, n_queries: int = 200, k: int = K, seed: int = 0
) -> dict[str, Any]:
    """Measure the curve up to a little past `target` and store it in index.build_info."""
    stop = min(0.999, target + MARGIN + 0.03)
    curve = measure(index, n_queries, k, seed, stop_at=stop)
    cal = {
        "target": target,
        "k": k,
        "queries": n_queries,
        "margin": MARGIN,
        "curve": curve,
        "coverage": effort_for(curve, target),
    }
    index.build_info["calibration"] = cal
    return cal
