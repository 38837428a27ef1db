"""Compiled (numba) build steps: the balanced k-means assignment and the OSQ code packing."""

from __future__ import annotations

import hearth.extras.vecsearch  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def balanced_assign(dist, cap):
    """Greedy capacity-constrained assignment: most decided points first, each to its nearest
    centroid that still has room. Keeps partitions within `cap` rows (balanced k-means step)."""
    n, p = dist.shape
    regret = np.empty(n, dtype=np.float32)
    for i in range(n):
        b1 = np.inf
        b2 = np.inf
        for j in range(p):
            v = dist[i, j]
            if v < b1:
                b2 = b1
                b1 = v
            elif v < b2:
                b2 = v
        regret[i] = b2 - b1 if p > 1 else 0.0
    order = np.argsort(-regret)
    fill = np.zeros(p, dtype=np.int64)
    out = np.empty(n, dtype=np.int32)
    for t in range(n):
        i = order[t]
        best = -1
        bv = np.inf
        for j in range(p):
            if fill[j] < cap and dist[i, j] < bv:
                bv = dist[i, j]
                best = j
        out[i] = best
        fill[best] += 1
    return out


@njit(nogil=True, cache=True)
def pack_codes(cells, bitoff, bits, out):
    """Pack per-dimension cell ids (u16[n, d]) into column-wise 8-bit segments out[nseg+1, n]."""
    n, d = cells.shape
    for i in range(n):
        for a in range(d):
            w = bits[a]
            if w == 0:
                continue
            bo = bitoff[a]
            v = np.int64(cells[i, a]) << (bo & 7)
            s = bo >> 3
            out[s, i] |= np.uint8(v & 0xFF)
            out[s + 1, i] |= np.uint8((v >> 8) & 0xFF)
