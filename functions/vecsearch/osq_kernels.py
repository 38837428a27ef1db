"""Compiled (numba) OSQ search kernel: per visited partition, rotate the query, build the
per-cell lower-bound tables, prune by sign-bit Hamming distance, bound the rest one 8-bit code
segment at a time (early abandoning against the running k-th) and re-rank the best exactly.
Each step is an inlined helper (``inline="always"``: one compiled loop nest, as if written
in place)."""

from __future__ import annotations

import hearth.extras.vecsearch  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
from numba import njit

from .row_kernels import (
    METRIC_IP,
    METRIC_L2,
    eval_exact,
    exact_dist,
    heap_insert,
    is_live,
    kth_smallest,
    popcount64,
)

SEED_SEGS = 6  # segments (about the 12 highest-variance dims) before seeding the k-th distance


@njit(inline="always", cache=True)
def _rerank_row(raw, q, i, metric, pred, stack, best_d, best_i, cnt, k):
    """Exact predicate check and exact distance for row i; insert into the running top k."""
    if pred[0].shape[0] > 0 and not eval_exact(pred, i, stack):
        return cnt
    return heap_insert(best_d, best_i, cnt, k, exact_dist(raw, q, i, metric), i)


@njit(inline="always", cache=True)
def _max_cells(bits, d):
    """Cell-table entries of the partition with the most cells (the bound table's size)."""
    max_cells = 0
    for p in range(bits.shape[0]):
        c = 0
        for dd in range(d):
            c += (1 << bits[p, dd]) + 1
        if c > max_cells:
            max_cells = c
    return max_cells


@njit(inline="always", cache=True)
def _max_partition_rows(list_part, range_ptr, ranges, nparts):
    """Rows of the largest partition (the candidate buffers' size)."""
    part_rows = np.zeros(nparts, dtype=np.int64)
    for li in range(list_part.shape[0]):
        for r in range(range_ptr[li], range_ptr[li + 1]):
            part_rows[list_part[li]] += ranges[r, 1] - ranges[r, 0]
    max_part = 0
    for p in range(nparts):
        if part_rows[p] > max_part:
            max_part = part_rows[p]
    return max_part


@njit(inline="always", cache=True)
def _rotate_query(q, p, metric, rot, means, qr):
    """qr = the query in partition p's PCA basis; returns the distance's constant term."""
    d = q.shape[0]
    const = np.float32(0.0)
    for a in range(d):
        acc_r = np.float32(0.0)
        for b in range(d):
            if metric == METRIC_L2:
                acc_r += rot[p, a, b] * (q[b] - means[p, b])
            else:
                acc_r += rot[p, a, b] * q[b]
        qr[a] = acc_r
    if metric == METRIC_IP:
        for b in range(d):
            const -= q[b] * means[p, b]
    return const


@njit(inline="always", cache=True)
def _cell_bounds(qr, p, metric, bits, bnd_off, bnd, lut, const):
    """Per-cell lower-bound table (l2: squared gap to the cell; ip: -max q*x in cell); returns
    the constant with each dimension's smallest bound moved into it."""
    base = bnd_off[p, 0]
    for a in range(qr.shape[0]):
        o = bnd_off[p, a] - base
        nc = 1 << bits[p, a]
        x = qr[a]
        mn = np.float32(np.inf)
        for c in range(nc):
            lo = bnd[base + o + c]
            hi = bnd[base + o + c + 1]
            if metric == METRIC_L2:
                if x < lo:
                    v = (lo - x) * (lo - x)
                elif x > hi:
                    v = (x - hi) * (x - hi)
                else:
                    v = np.float32(0.0)
            else:
                v = -max(x * lo, x * hi)
            lut[o + c] = v
            mn = min(mn, v)
        # move the dimension's smallest bound into the constant: every table entry is
        # then >= 0, so a partial bound only grows dimension by dimension (early
        # abandoning is valid for ip too, whose cell bounds can be negative)
        for c in range(nc):
            lut[o + c] -= mn
        const += mn
    return const


@njit(inline="always", cache=True)
def _hamming_candidates(
    qi, vi, p, order, nv, list_part, list_rc, qr, sign_dims, range_ptr, ranges, signs,
    alive, has_mask, qmask, cand, ham, hist,
):  # fmt: skip
    """Live rows passing the quantized filter in partition p's visited lists (from the vi-th
    on), with their sign-bit Hamming distance and its histogram; returns how many."""
    nc_ = 0
    for h in range(66):
        hist[h] = 0
    for vj in range(vi, nv):
        li = order[qi, vj]
        if list_part[li] != p:
            continue
        qsign = np.uint64(0)
        for a in range(sign_dims):
            if qr[a] > list_rc[li, a]:
                qsign |= np.uint64(1) << np.uint64(a)
        for r in range(range_ptr[li], range_ptr[li + 1]):
            for i in range(ranges[r, 0], ranges[r, 1]):
                if is_live(alive, i) == 0:
                    continue
                if has_mask and qmask[i] == 0:
                    continue
                h = np.int32(popcount64(np.uint64(signs[i]) ^ qsign))
                cand[nc_] = i
                ham[nc_] = h
                hist[h] += 1
                nc_ += 1
    return nc_


@njit(inline="always", cache=True)
def _hamming_cut(hist, nc_, keep_frac, min_keep):
    """The Hamming distance that keeps the best keep_frac (at least min_keep) candidates."""
    want = int(np.ceil(keep_frac * nc_))
    if want < min_keep:
        want = min_keep
    thr = 0
    run = 0
    for h in range(66):
        run += hist[h]
        thr = h
        if run >= want:
            break
    return thr


@njit(inline="always", cache=True)
def _segment_tables(p, dim_order, bits, bitoff, bnd_off, lut, seg_lut, nseg):
    """Fold the per-dimension bounds of each 8-bit code segment into one 256-entry table (every
    code lies inside one byte): a row then costs one lookup per byte, not one per dimension."""
    base = bnd_off[p, 0]
    for sg in range(nseg):
        seg_lut[sg, 0] = 0.0
    for t in range(dim_order.shape[1]):
        a = dim_order[p, t]
        w = bits[p, a]
        o = bnd_off[p, a] - base
        if w == 0:
            continue  # one cell: its bound is already in the constant
        sg = bitoff[p, a] >> 3
        sh = bitoff[p, a] & 7
        for hi in range((1 << w) - 1, -1, -1):
            tv = lut[o + hi]
            for lo in range(1 << sh):
                seg_lut[sg, (hi << sh) | lo] = seg_lut[sg, lo] + tv


@njit(inline="always", cache=True)
def _kept_by_hamming(cand, ham, nc_, thr, const, sel, acc):
    """sel = the candidates within the Hamming cut, acc = their bound's constant; returns how many."""
    ns = 0
    for j in range(nc_):
        if ham[j] <= thr:
            sel[ns] = cand[j]
            acc[ns] = const
            ns += 1
    return ns


@njit(inline="always", cache=True)
def _segment_scan(
    qi, q, metric, seg_lut, codes, nseg, sel, acc, ns, raw, pred, stack, k, rerank, kbuf,
    best_d, best_i, cnt, stats,
):  # fmt: skip
    """Lower bounds one segment at a time (column-wise codes). After SEED_SEGS segments the
    rows with the smallest partial bounds are re-ranked exactly to seed the k-th distance
    (and dropped here); every 2 segments rows whose partial bound already exceeds the k-th
    are abandoned (segments come by variance). Returns (rows left, top-k count, re-ranked)."""
    kept = 0
    seed_at = min(SEED_SEGS, nseg) - 1
    for sg in range(nseg):
        tab = seg_lut[sg]
        col = codes[sg]
        for j in range(ns):
            acc[j] += tab[col[sel[j]]]
        stats[qi, 4] += ns
        if sg == seed_at and cnt < k and ns > rerank:
            # seed the k-th distance: exact distances of the rows whose partial bound over
            # the highest-variance segments is smallest (they are done; drop them below)
            cut = kth_smallest(acc, ns, rerank, kbuf)
            for j in range(ns):
                if acc[j] <= cut and kept < rerank:
                    kept += 1
                    cnt = _rerank_row(raw, q, sel[j], metric, pred, stack, best_d, best_i, cnt, k)
                    acc[j] = np.inf
        # early abandon: a partial lower bound above the current k-th exact distance
        # can only grow, so the row cannot enter the top k
        if cnt == k and (sg & 1) == 1 and sg + 1 < nseg:
            lim = best_d[k - 1]
            w2 = 0
            for j in range(ns):
                if acc[j] <= lim:
                    sel[w2] = sel[j]
                    acc[w2] = acc[j]
                    w2 += 1
            ns = w2
    return ns, cnt, kept


@njit(inline="always", cache=True)
def _final_rerank(q, metric, sel, acc, ns, raw, pred, stack, k, rerank, kbuf, best_d, best_i, cnt):
    """Exact re-rank (raw vectors, exact predicate) of the `rerank` smallest bounds that can
    still beat the current k-th; returns (top-k count, rows re-ranked)."""
    limit = np.inf
    if cnt == k:
        limit = best_d[k - 1]
    if ns > rerank:
        cut = kth_smallest(acc, ns, rerank, kbuf)
        if cut < limit:
            limit = np.nextafter(np.float32(cut), np.float32(np.inf))  # ties allowed
    n_final = 0
    for j in range(ns):
        if acc[j] > limit or acc[j] == np.inf:
            continue
        if n_final >= rerank:
            break
        n_final += 1
        cnt = _rerank_row(raw, q, sel[j], metric, pred, stack, best_d, best_i, cnt, k)
    return cnt, n_final


@njit(nogil=True, cache=True)
def search_batch(
    queries,  # f32[Q, d]
    metric,  # METRIC_L2 / METRIC_IP
    order,  # i32[Q, L] lists by centroid distance
    nvisit,  # i32[Q] how many of them to visit
    list_part,  # i32[L] partition (quantizer) of each list
    list_rc,  # f32[L, d] list centres in the partition's rotated frame (sign-bit origin)
    owned,  # u8[P] partitions this holder searches
    rot,  # f32[P, d, d]
    means,  # f32[P, d]
    bits,  # u8[P, d]
    bitoff,  # i32[P, d] (every code inside one byte: quantize.pack_bytes)
    dim_order,  # i32[P, d] dims by bit offset, zero-bit dims last (segment tables built in order)
    bnd_off,  # i64[P, d] offset of the dim's cell boundaries in bnd
    bnd,  # f32[*] cell boundaries (2**bits + 1 per dim)
    range_ptr,  # i64[L + 1] -> ranges
    ranges,  # i64[R, 2] row ranges [start, end)
    codes,  # u8[nseg + 1, N] column-wise 8-bit segments
    signs,  # u32[N]
    sign_dims,
    alive,  # u64[ceil(N/64)]
    has_mask,
    qmask,  # u8[N] quantized (superset) predicate mask
    raw,  # f32[N, d]
    pred,  # exact predicate: Program.exact_args() + (attrs f64[A, N],), see eval_exact
    k,
    keep_frac,
    min_keep,
    rerank,
    out_pos,  # i64[Q, k]
    out_dist,  # f32[Q, k]
    out_cnt,  # i64[Q]
    stats,  # i64[Q, 5]: partitions, hamming-scanned, lb-computed, re-ranked, cell lookups
):
    nq, d = queries.shape
    lut = np.empty(_max_cells(bits, d), dtype=np.float32)
    nseg = codes.shape[0] - 1
    seg_lut = np.zeros((max(1, nseg), 256), dtype=np.float32)
    qr = np.empty(d, dtype=np.float32)
    nparts = rot.shape[0]
    max_part = _max_partition_rows(list_part, range_ptr, ranges, nparts)
    done = np.zeros(nparts, dtype=np.uint8)
    cand = np.empty(max_part, dtype=np.int64)
    ham = np.empty(max_part, dtype=np.int32)
    acc = np.empty(max_part, dtype=np.float32)
    sel = np.empty(max_part, dtype=np.int64)
    hist = np.zeros(66, dtype=np.int64)
    kbuf = np.empty(max(1, rerank), dtype=np.float32)
    stack = np.zeros(max(1, pred[0].shape[0]), dtype=np.bool_)
    for qi in range(nq):
        q = queries[qi]
        best_d = out_dist[qi]
        best_i = out_pos[qi]
        cnt = 0
        nv = nvisit[qi]
        for vi in range(nv):
            done[list_part[order[qi, vi]]] = 0
        # partitions in order of their nearest visited list; each partition once, with all of
        # its visited lists (one query rotation and one lower-bound table per partition)
        for vi in range(nv):
            p = list_part[order[qi, vi]]
            if owned[p] == 0 or done[p] != 0:
                continue
            done[p] = 1
            stats[qi, 0] += 1
            const = _rotate_query(q, p, metric, rot, means, qr)
            const = _cell_bounds(qr, p, metric, bits, bnd_off, bnd, lut, const)
            nc_ = _hamming_candidates(
                qi, vi, p, order, nv, list_part, list_rc, qr, sign_dims, range_ptr, ranges,
                signs, alive, has_mask, qmask, cand, ham, hist,
            )  # fmt: skip
            stats[qi, 1] += nc_
            if nc_ == 0:
                continue
            thr = _hamming_cut(hist, nc_, keep_frac, min_keep)
            _segment_tables(p, dim_order, bits, bitoff, bnd_off, lut, seg_lut, nseg)
            ns = _kept_by_hamming(cand, ham, nc_, thr, const, sel, acc)
            stats[qi, 2] += ns
            ns, cnt, kept = _segment_scan(
                qi, q, metric, seg_lut, codes, nseg, sel, acc, ns, raw, pred, stack, k, rerank,
                kbuf, best_d, best_i, cnt, stats,
            )  # fmt: skip
            cnt, n_final = _final_rerank(
                q, metric, sel, acc, ns, raw, pred, stack, k, rerank, kbuf, best_d, best_i, cnt
            )
            stats[qi, 3] += kept + n_final
        out_cnt[qi] = cnt
