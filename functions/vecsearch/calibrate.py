"""Recall target instead of knobs: measure, at build time, the recall@k the visit plan reaches at
growing coverage on held-out samples of the base rows, and keep the curve in the index.

The sampled rows are tombstoned for the measurement (cleared in the `alive` bitmap, restored
after), so they are truly held out: searched as queries against an index that does not hold them,
with the brute-force truth over the other rows. (Searching a row that stays in the index is
easier: its own list is the nearest, and its neighbours sit around it; on GloVe that
over-estimated recall by ~0.02.)
The effort for a target is then read off the curve (`effort_for`): the smallest measured coverage
whose recall reached target + MARGIN (the margin absorbs the sample's noise, about +-0.005 at
200 queries x 10 neighbours, and the gap between base rows and real held-out queries)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .index import VecIndex

GRID = (
    0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.09, 0.1,
    0.115, 0.13, 0.145, 0.16, 0.18, 0.2, 0.225, 0.25, 0.275, 0.3, 0.335, 0.37, 0.41, 0.45, 0.55,
    0.7, 0.85, 1.0,
)  # fmt: skip
# ~10% steps through the range the 0.9-0.99 targets land in (a coarser step makes the search
# cover up to the step's width more than the target needs: 0.3 instead of 0.275 on MiniLM)
MARGIN = 0.015
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
    """Exact top-k external ids of raw rows `pos` among the live rows (`pos` not among them)."""
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
    n_q = min(n_queries, len(live) // 2)
    pos = np.sort(rng.choice(live, n_q, replace=False))
    rest = np.setdiff1d(live, pos)
    truth = _truth(index, pos, rest, k)
    qs = np.array(index.raw[pos])
    saved = index.alive.copy()
    for p in pos:
        index.alive[p >> 6] &= ~np.uint64(1 << int(p & 63))
    curve = []
    try:
        for cov in GRID:
            prm = query.SearchParams(coverage=cov, threads=1)
            res = query.search(index, qs, k, metric=index.metric, params=prm)
            hit = tot = 0
            for qi in range(len(pos)):
                t = set(int(i) for i in truth[qi] if i >= 0)
                hit += len(t & set(int(i) for i in res.ids[qi] if i >= 0))
                tot += len(t)
            rec = hit / tot if tot else 1.0
            curve.append([cov, round(rec, 4)])
            if rec >= stop_at:
                break
    finally:
        index.alive[:] = saved
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
