"""SOAR-style spilled assignment (Sun et al., NeurIPS 2023) for the RaBitQ scan: each row is also
scanned in a second list of its partition, chosen so that the query directions its own list
serves badly are served by the second one.

Why: a row is missed when the query lands near the row but its list centroid ranks low; the list
plan then has to cover many rows to find it. SOAR picks the second centroid c' minimizing
|x - c'|^2 + lam * <r, x - c'>^2 / |r|^2 (r = x - c, the primary residual): a second residual
nearly orthogonal to the first, so the two lists' errors are unlike. Pure (no I/O); the
codes of the spilled copies are taken around c' (`rabitq.encode`) when the blocks are packed."""

from __future__ import annotations

import numpy as np

LAMBDA = 1.0


def assign(
    x: np.ndarray,
    lst: np.ndarray,
    lcent: np.ndarray,
    lpart: np.ndarray,
    lam: float = LAMBDA,
    chunk: int = 8192,
) -> np.ndarray:
    """Second list i64[n] of rows x (n, d) with primary lists lst, among the lists of the same
    partition (-1 where the partition has a single list). Rows go `chunk` at a time, so the
    scratch is chunk x lists-per-partition floats, whatever n."""
    out = np.full(len(x), -1, dtype=np.int64)
    part = lpart[lst]
    for p in np.unique(part):
        cand = np.nonzero(lpart == p)[0]
        if len(cand) < 2:
            continue
        c = lcent[cand].astype(np.float32)
        cc = (c * c).sum(1)[None, :]
        mine = np.nonzero(part == p)[0]
        for s in range(0, len(mine), chunk):
            rows = mine[s : s + chunk]
            xs = x[rows].astype(np.float32)
            r = xs - lcent[lst[rows]]
            rn2 = np.maximum((r * r).sum(1), 1e-12)
            cost = (xs * xs).sum(1)[:, None] - 2 * xs @ c.T + cc  # |x - c'|^2
            proj = (r * xs).sum(1)[:, None] - r @ c.T  # <r, x - c'>
            cost += lam * proj * proj / rn2[:, None]
            cost[np.arange(len(rows)), np.searchsorted(cand, lst[rows])] = np.inf
            out[rows] = cand[np.argmin(cost, axis=1)]
    return out
