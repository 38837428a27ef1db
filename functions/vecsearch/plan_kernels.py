"""Compiled (numba) visit planning: the query . list-centroid products, the per-list candidate
counts, and the visit plan (which lists each query scans, nearest first)."""

from __future__ import annotations

import hearth.extras.vecsearch  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
from numba import njit

from .row_kernels import is_live

NBINS = 1024


@njit(nogil=True, cache=True, fastmath=True)
def gram(q, c, out):
    """out[i, l] = q[i] . c[l] in float32. Compiled rather than a BLAS call: numpy's OpenBLAS
    starts its own thread pool for this product and its spinning workers took a second core
    (measured: 2x wall time per query on a loaded 2-core machine with threads=1). Four queries
    share each pass over a centroid: the centroids (L x d floats, 420 KB at 274 x 384) are read
    from cache a quarter as often (6.2 -> 3.2 us per 384-d query)."""
    nq, d = q.shape
    for i in range(0, nq - 3, 4):
        q0, q1, q2, q3 = q[i], q[i + 1], q[i + 2], q[i + 3]
        for li in range(c.shape[0]):
            cr = c[li]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for b in range(d):
                v = cr[b]
                s0 += q0[b] * v
                s1 += q1[b] * v
                s2 += q2[b] * v
                s3 += q3[b] * v
            out[i, li] = s0
            out[i + 1, li] = s1
            out[i + 2, li] = s2
            out[i + 3, li] = s3
    for i in range(nq - nq % 4, nq):
        for li in range(c.shape[0]):
            s = np.float32(0.0)
            for b in range(d):
                s += q[i, b] * c[li, b]
            out[i, li] = s


@njit(nogil=True, cache=True)
def list_counts(range_ptr, ranges, alive, has_mask, mask, out):
    """Live (and, with a mask, quantized-filter-passing) rows per list: the candidate counts
    the visit plan needs."""
    for li in range(out.shape[0]):
        c = 0
        for r in range(range_ptr[li], range_ptr[li + 1]):
            for i in range(ranges[r, 0], ranges[r, 1]):
                if has_mask:
                    c += mask[i]
                else:
                    c += is_live(alive, i)
        out[li] = c


@njit(inline="always", cache=True)
def _sift_down(hv, hi, n, j):
    """Restore the min-heap (values hv, positions hi, first n live) below slot j."""
    while True:
        c = 2 * j + 1
        if c >= n:
            return
        if c + 1 < n and hv[c + 1] < hv[c]:
            c += 1
        if hv[j] <= hv[c]:
            return
        hv[j], hv[c] = hv[c], hv[j]
        hi[j], hi[c] = hi[c], hi[j]
        j = c


@njit(inline="always", cache=True)
def _pop_min(hv, hi, n, srt, ns):
    """Move the heap's smallest position to srt[ns]; returns the new heap size."""
    srt[ns] = hi[0]
    n -= 1
    hv[0] = hv[n]
    hi[0] = hi[n]
    _sift_down(hv, hi, n, 0)
    return n


@njit(inline="always", cache=True)
def _nearest_bins(row, m, hist):
    """Histogram selection: the lists in the bins holding the m nearest (a few more at the
    edge); returns them and their count."""
    L = row.shape[0]
    lo = row[0]
    hi = row[0]
    for li in range(L):
        lo = min(lo, row[li])
        hi = max(hi, row[li])
    scale = NBINS / (hi - lo + 1e-12)
    hist[:] = 0
    for li in range(L):
        hist[min(NBINS - 1, int((row[li] - lo) * scale))] += 1
    run = 0
    top = NBINS - 1
    for bn in range(NBINS):
        run += hist[bn]
        if run >= m:
            top = bn
            break
    idx = np.empty(run, dtype=np.int64)
    c = 0
    for li in range(L):
        if min(NBINS - 1, int((row[li] - lo) * scale)) <= top:
            idx[c] = li
            c += 1
    return idx, c


@njit(inline="always", cache=True)
def _walk_within(vals, sizes, idx, hv, hi, hn, srt, ns, m, ratio):
    """The lists within `ratio` x the nearest centroid distance, popped from the heap in order:
    (how many, their live rows, heap size, sorted count)."""
    lim = ratio * np.sqrt(vals[srt[0]]) + 1e-9
    n_within = 0
    rows_within = 0
    for j in range(m):
        if ns <= j:
            hn = _pop_min(hv, hi, hn, srt, ns)
            ns += 1
        if np.sqrt(vals[srt[j]]) <= lim:
            n_within = j + 1
            rows_within += sizes[idx[srt[j]]]
        else:
            break
    return n_within, rows_within, hn, ns


@njit(inline="always", cache=True)
def _walk_count(cnt, idx, hv, hi, hn, srt, ns, m, need):
    """The nearest lists whose counts cover `need` rows: (how many, heap size, sorted count)."""
    covered = 0
    n_need = 0
    for j in range(m):
        if covered >= need:
            break
        if ns <= j:
            hn = _pop_min(hv, hi, hn, srt, ns)
            ns += 1
        covered += cnt[idx[srt[j]]]
        n_need = j + 1
    return n_need, hn, ns


@njit(nogil=True, cache=True)
def plan_lists(
    gram,  # f32[Q, L] query . list centroid
    qq,  # f32[Q] squared query norms
    cc,  # f32[L] squared centroid norms
    cnt,  # i64[L] rows each list contributes to the count criterion (live or filter-passing)
    sizes,  # i64[L] live rows per list
    ratio,  # distance criterion: visit lists within ratio x the nearest centroid distance
    base_rows,  # count criterion (rows an unfiltered pass covers)
    filtered,  # filtered: cover filter_coverage x max(base_rows, rows within ratio) passing rows
    filter_coverage,
    max_visit,  # 0 -> no cap
    m_guess,  # lists to select first (grown x4 until the rules are satisfied)
    out_order,  # i32[Q, W] lists by centroid distance (first out_nvisit[q] are meaningful)
    out_nvisit,  # i32[Q]; -1 when the plan needs more than W lists
):
    """The visit plan of each query without sorting all L lists: select the m nearest lists
    (quickselect), sort only those, walk them until both rules hold; grow m if they do not."""
    nq, L = gram.shape
    row = np.empty(L, dtype=np.float32)
    hist = np.zeros(NBINS, dtype=np.int64)
    for qi in range(nq):
        for li in range(L):
            row[li] = max(qq[qi] - 2.0 * gram[qi, li] + cc[li], 0.0)
        m = min(L, max(1, m_guess))
        while True:
            if m < L:
                idx, m = _nearest_bins(row, m, hist)
            else:
                idx = np.arange(L)
            vals = np.empty(m, dtype=np.float32)
            hi = np.arange(m)
            for j in range(m):
                vals[j] = row[idx[j]]
            # a heap, not a full argsort: the walks below read only the ~nv nearest in order
            hv = vals.copy()
            for j in range(m // 2 - 1, -1, -1):
                _sift_down(hv, hi, m, j)
            srt = np.empty(m, dtype=np.int64)
            hn = _pop_min(hv, hi, m, srt, 0)
            n_within, rows_within, hn, ns = _walk_within(
                vals, sizes, idx, hv, hi, hn, srt, 1, m, ratio
            )
            need = base_rows
            if filtered:
                need = np.int64(filter_coverage * max(rows_within, base_rows))
            n_need, hn, ns = _walk_count(cnt, idx, hv, hi, hn, srt, ns, m, need)
            nv = max(n_within, n_need)
            if m < L and (nv >= m or (n_within == m)):
                m = min(L, m * 4)  # the rules need more lists than selected: select more
                continue
            if max_visit > 0 and nv > max_visit:
                nv = max_visit
            if nv > out_order.shape[1]:
                out_nvisit[qi] = -1  # wider than the output: the caller re-plans this query
                break
            for j in range(min(ns, out_order.shape[1])):  # the sorted prefix (>= nv lists)
                out_order[qi, j] = idx[srt[j]]
            out_nvisit[qi] = nv
            break
