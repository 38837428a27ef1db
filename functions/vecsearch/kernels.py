"""Compiled (numba) inner loops. Pure functions over flat arrays: no I/O, no Python objects.

Why numba: the per-partition pipeline (Hamming prune -> cell lower bound -> exact re-rank) is a
sequence of data-dependent loops over a few thousand vectors per query; numpy would need many
small array calls per (query, partition) pair and lose to faiss on Python overhead alone.
All kernels release the GIL (``nogil``) so a batch can be split over threads.
"""

from __future__ import annotations

import hearth.extras.vecsearch  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
from numba import njit

# Predicate program opcodes (postfix / RPN). See predicates.compile_program.
OP_LEAF = 0
OP_AND = 1
OP_OR = 2

# Leaf kinds.
LEAF_RANGE = 0
LEAF_IN = 1

METRIC_L2 = 0
METRIC_IP = 1

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(inline="always", cache=True)
def popcount64(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@njit(inline="always", cache=True)
def _alive(alive, i):
    return (alive[i >> 6] >> np.uint64(i & 63)) & np.uint64(1)


@njit(inline="always", cache=True)
def _apply_op(op, stack, sp):
    """AND / OR the two top entries of the predicate stack; returns the new stack size."""
    sp -= 1
    if op == OP_AND:
        stack[sp - 1] = stack[sp - 1] and stack[sp]
    else:
        stack[sp - 1] = stack[sp - 1] or stack[sp]
    return sp


@njit(cache=True)
def eval_exact(pred, i, stack):
    """Evaluate the exact predicate program on raw attribute values of row ``i``.

    ``pred`` is ``Program.exact_args() + (attrs,)``: (prog, leaf_attr, leaf_kind, leaf_lo,
    leaf_hi, leaf_set_off, leaf_set_len, sets, attrs f64[A, N]), one tuple argument."""
    prog, leaf_attr, leaf_kind, leaf_lo, leaf_hi, leaf_set_off, leaf_set_len, sets, attrs = pred
    sp = 0
    for t in range(prog.shape[0]):
        op = prog[t, 0]
        if op == OP_LEAF:
            j = prog[t, 1]
            v = attrs[leaf_attr[j], i]
            if leaf_kind[j] == LEAF_RANGE:
                ok = v >= leaf_lo[j] and v <= leaf_hi[j]
            else:
                ok = False
                o = leaf_set_off[j]
                for s in range(leaf_set_len[j]):
                    if sets[o + s] == v:
                        ok = True
                        break
            stack[sp] = ok
            sp += 1
        else:
            sp = _apply_op(op, stack, sp)
    return stack[0]


@njit(nogil=True, cache=True)
def quantized_mask(prog, leaf_attr, allowed, acodes, alive, out):
    """Superset mask from attribute *codes*: a row passes if its cells may satisfy the predicate."""
    n = out.shape[0]
    stack = np.zeros(max(1, prog.shape[0]), dtype=np.bool_)
    for i in range(n):
        if _alive(alive, i) == 0:
            out[i] = 0
            continue
        sp = 0
        for t in range(prog.shape[0]):
            op = prog[t, 0]
            if op == OP_LEAF:
                j = prog[t, 1]
                stack[sp] = allowed[j, acodes[leaf_attr[j], i]] != 0
                sp += 1
            else:
                sp = _apply_op(op, stack, sp)
        out[i] = 1 if stack[0] else 0


@njit(nogil=True, cache=True)
def exact_mask(pred, alive, out):
    """Exact predicate over every live row (used for counts, tests and the exact fallback);
    ``pred`` as in eval_exact."""
    n = out.shape[0]
    nprog = pred[0].shape[0]
    stack = np.zeros(max(1, nprog), dtype=np.bool_)
    for i in range(n):
        if _alive(alive, i) == 0:
            out[i] = 0
        elif nprog == 0:
            out[i] = 1
        else:
            out[i] = 1 if eval_exact(pred, i, stack) else 0


@njit(inline="always", cache=True)
def _heap_insert(best_d, best_i, cnt, k, d, i):
    """Keep the k smallest (d, i) in a sorted array; returns the new count."""
    if cnt == k and d >= best_d[k - 1]:
        return cnt
    j = cnt if cnt < k else k - 1
    while j > 0 and best_d[j - 1] > d:
        best_d[j] = best_d[j - 1]
        best_i[j] = best_i[j - 1]
        j -= 1
    best_d[j] = d
    best_i[j] = i
    return cnt + 1 if cnt < k else cnt


SEED_SEGS = 6  # segments (about the 12 highest-variance dims) before seeding the k-th distance


@njit(inline="always", cache=True)
def _kth_smallest(acc, ns, r, buf):
    """r-th smallest of acc[:ns] (r << ns) with a small sorted buffer: one compare per value,
    far cheaper than np.partition's copy + quickselect on thousands of values."""
    for t in range(r):
        buf[t] = np.inf
    for j in range(ns):
        v = acc[j]
        if v < buf[r - 1]:
            t = r - 1
            while t > 0 and buf[t - 1] > v:
                buf[t] = buf[t - 1]
                t -= 1
            buf[t] = v
    return buf[r - 1]


@njit(inline="always", cache=True)
def _exact_dist(raw, q, i, metric):
    """Exact distance of row i to q: squared l2, or minus the inner product."""
    dist = np.float32(0.0)
    if metric == METRIC_L2:
        for b in range(q.shape[0]):
            t = raw[i, b] - q[b]
            dist += t * t
    else:
        for b in range(q.shape[0]):
            dist -= raw[i, b] * q[b]
    return dist


@njit(inline="always", cache=True)
def _rerank_row(raw, q, i, metric, pred, stack, best_d, best_i, cnt, k):
    """Exact predicate check and exact distance for row i; insert into the running top k."""
    if pred[0].shape[0] > 0 and not eval_exact(pred, i, stack):
        return cnt
    return _heap_insert(best_d, best_i, cnt, k, _exact_dist(raw, q, i, metric), i)


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
    max_cells = 0
    for p in range(rot.shape[0]):
        c = 0
        for dd in range(d):
            c += (1 << bits[p, dd]) + 1
        if c > max_cells:
            max_cells = c
    lut = np.empty(max_cells, dtype=np.float32)
    nseg = codes.shape[0] - 1
    seg_lut = np.zeros((max(1, nseg), 256), dtype=np.float32)
    qr = np.empty(d, dtype=np.float32)
    nparts = rot.shape[0]
    part_rows = np.zeros(nparts, dtype=np.int64)
    for li in range(list_part.shape[0]):
        for r in range(range_ptr[li], range_ptr[li + 1]):
            part_rows[list_part[li]] += ranges[r, 1] - ranges[r, 0]
    max_part = 0
    for p in range(nparts):
        if part_rows[p] > max_part:
            max_part = part_rows[p]
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
            # 1. rotate the query into the partition's PCA basis
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
            # 2. per-cell lower-bound table (l2: squared gap to the cell; ip: -max q*x in cell)
            base = bnd_off[p, 0]
            for a in range(d):
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
            # 3. Hamming distance on sign bits over rows passing the quantized filter
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
                        if _alive(alive, i) == 0:
                            continue
                        if has_mask and qmask[i] == 0:
                            continue
                        h = np.int32(popcount64(np.uint64(signs[i]) ^ qsign))
                        cand[nc_] = i
                        ham[nc_] = h
                        hist[h] += 1
                        nc_ += 1
            stats[qi, 1] += nc_
            if nc_ == 0:
                continue
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
            # 4. lower bound from cells, one 8-bit segment at a time (column-wise codes): every
            # code lies inside one byte, so the per-dimension bounds of a segment fold into one
            # 256-entry table and a row costs one lookup per byte, not one extraction per dim
            for sg in range(nseg):
                seg_lut[sg, 0] = 0.0
            for t in range(d):
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
            ns = 0
            for j in range(nc_):
                if ham[j] <= thr:
                    sel[ns] = cand[j]
                    acc[ns] = const
                    ns += 1
            stats[qi, 2] += ns
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
                    cut = _kth_smallest(acc, ns, rerank, kbuf)
                    for j in range(ns):
                        if acc[j] <= cut and kept < rerank:
                            kept += 1
                            cnt = _rerank_row(
                                raw, q, sel[j], metric, pred, stack, best_d, best_i, cnt, k
                            )
                            acc[j] = np.inf
                # early abandon: a partial lower bound above the current k-th exact distance
                # can only grow, so the row cannot enter the top k (segments come by variance)
                if cnt == k and (sg & 1) == 1 and sg + 1 < nseg:
                    lim = best_d[k - 1]
                    w2 = 0
                    for j in range(ns):
                        if acc[j] <= lim:
                            sel[w2] = sel[j]
                            acc[w2] = acc[j]
                            w2 += 1
                    ns = w2
            # 5. keep the `rerank` smallest bounds that can still beat the current k-th
            limit = np.inf
            if cnt == k:
                limit = best_d[k - 1]
            if ns > rerank:
                cut = _kth_smallest(acc, ns, rerank, kbuf)
                if cut < limit:
                    limit = np.nextafter(np.float32(cut), np.float32(np.inf))  # ties allowed
            # 6. exact re-rank on raw vectors with the exact predicate
            n_final = 0
            for j in range(ns):
                if acc[j] > limit or acc[j] == np.inf:
                    continue
                if n_final >= rerank:
                    break
                n_final += 1
                cnt = _rerank_row(raw, q, sel[j], metric, pred, stack, best_d, best_i, cnt, k)
            kept += n_final
            stats[qi, 3] += kept
        out_cnt[qi] = cnt


@njit(nogil=True, cache=True)
def exact_batch(
    queries,
    metric,
    list_part,
    owned,
    range_ptr,
    ranges,
    alive,
    raw,
    pred,
    k,
    out_pos,
    out_dist,
    out_cnt,
):
    """Brute force over every live row of the owned partitions (recall 1.0 by construction)."""
    nq = queries.shape[0]
    stack = np.zeros(max(1, pred[0].shape[0]), dtype=np.bool_)
    has_pred = pred[0].shape[0] > 0
    for qi in range(nq):
        q = queries[qi]
        best_d = out_dist[qi]
        best_i = out_pos[qi]
        cnt = 0
        for li in range(list_part.shape[0]):
            if owned[list_part[li]] == 0:
                continue
            for r in range(range_ptr[li], range_ptr[li + 1]):
                for i in range(ranges[r, 0], ranges[r, 1]):
                    if _alive(alive, i) == 0:
                        continue
                    if has_pred and not eval_exact(pred, i, stack):
                        continue
                    dist = _exact_dist(raw, q, i, metric)
                    cnt = _heap_insert(best_d, best_i, cnt, k, dist, i)
        out_cnt[qi] = cnt


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
                    c += _alive(alive, i)
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


NBINS = 1024


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
                # histogram selection: the bins holding the m nearest (a few more at the edge)
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
                m = c
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
            ns = 1
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
            need = base_rows
            if filtered:
                need = np.int64(filter_coverage * max(rows_within, base_rows))
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
