"""Compiled (numba) RaBitQ search kernel: IVF scan over 1-bit codes in blocks of 32 rows
(fastscan.py) with bound-decided exact re-rank (see rabitq.py for the codes), and the shared
rotation. Shares the row helpers (tombstones, exact predicate, top-k heap) with osq_kernels.py
(row_kernels.py); the scan's steps are inlined helpers (one compiled loop nest), except the
lanes' bounds (see there)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from .fastscan import LANES, block_sums, query_lut
from .row_kernels import METRIC_L2, eval_exact, heap_insert, is_live

# float sums may be reassociated (vectorized); no "nnan"/"ninf": the kernel compares with inf
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def prefetch(typingctx, arr, idx):
    """llvm.prefetch of arr[idx] (read, keep in all cache levels): the rows the bound selects for
    the exact re-rank are fetched while the rest of the range is still being estimated."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        args_ = [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3)]
        builder.call(fn, [*args_, ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def l2sq(a, b):
    """|a - b|^2 in float32, vectorized (the kernel's own loops keep strict float order)."""
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        t = a[j] - b[j]
        s += t * t
    return s


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot(a, b):
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@njit(nogil=True, cache=True)
def rotate_rows(x, flip, perm, out):
    """out[i] = P x[i] zero-padded (rabitq.Rotation): per round a sign flip and a permutation,
    then an in-place fast Walsh-Hadamard transform of each 64-dim block (6 butterfly stages,
    scaled by 1/8), the same as multiplying by the normalized 64 x 64 Sylvester matrix."""
    n, d = x.shape
    D = out.shape[1]
    a = np.empty(D, np.float32)
    b = np.empty(D, np.float32)
    scale = np.float32(0.125)
    for i in range(n):
        for j in range(d):
            a[j] = x[i, j]
        for j in range(d, D):
            a[j] = 0.0
        for t in range(flip.shape[0]):
            for j in range(D):
                b[j] = a[perm[t, j]] * flip[t, perm[t, j]]
            for blk in range(0, D, 64):
                h = 1
                while h < 64:
                    for s0 in range(blk, blk + 64, 2 * h):
                        for j in range(s0, s0 + h):
                            u = b[j]
                            v = b[j + h]
                            b[j] = u + v
                            b[j + h] = u - v
                    h *= 2
            for j in range(D):
                a[j] = b[j] * scale
        for j in range(D):
            out[i, j] = a[j]


QBITS = 4  # the rotated query is quantized to 4-bit integers (RaBitQ's B_q)


@njit(nogil=True, cache=True)
def rq_levels(rq, u):
    """Quantize a rotated query to QBITS-bit unsigned integers u = round((rq - lo) / delta), so
    that <b01, rq> ~= delta * <b01, u> + lo * popcount(b01) for a 0/1 code b01.
    Returns (lo, delta, sum(rq))."""
    D = rq.shape[0]
    lo = rq[0]
    hi = rq[0]
    srq = np.float32(0.0)
    for b in range(D):
        lo = min(lo, rq[b])
        hi = max(hi, rq[b])
        srq += rq[b]
    delta = np.float32((hi - lo) / ((1 << QBITS) - 1))
    if delta <= 0:
        delta = np.float32(1e-30)
    for b in range(D):
        u[b] = np.int64((rq[b] - lo) / delta + 0.5)
    return lo, delta, srq


@njit(nogil=True, cache=True)
def rq_planes(rq, planes):
    """rq_levels, with bit j of every u stored as a bit plane planes[j] (u64 words, the codes'
    bit order): <b01, u> = sum_j 2^j popcount(code & planes[j]), AND + POPCNT on 64 dimensions
    at a time (the one-row-at-a-time form of the sums fastscan.py computes per block)."""
    D = rq.shape[0]
    u = np.empty(D, np.int64)
    lo, delta, srq = rq_levels(rq, u)
    planes[:] = 0
    for b in range(D):
        for j in range(QBITS):
            if (u[b] >> j) & 1:
                planes[j, b >> 6] |= np.uint64(1) << np.uint64(b & 63)
    return lo, delta, srq


@njit(inline="always", cache=True)
def _list_terms(q, c, metric, eps0, qn, delta, qspread):
    """A visited list's terms: its part of every estimate, |q - c|^2 (l2) or -q.c (ip); the
    code error's width eps0 x |y| (scaled); the scale of <b, q>; the query rounding's width."""
    if metric == METRIC_L2:
        y2 = l2sq(q, c)
        ey = np.float32(2.0 * eps0 * np.sqrt(y2))
        sc = np.float32(2.0)
    else:
        y2 = -dot(q, c)
        ey = np.float32(eps0 * qn)
        sc = np.float32(1.0)
    eq = np.float32(eps0 * sc * delta * qspread)
    return y2, ey, sc, eq


@njit(inline="always", cache=True)
def _block_candidates(lbv, lim, o, blk_rows, alive, has_mask, qmask, raw, cand, cand_lb):
    """The block's live, filter-passing rows whose bound beats `lim`, with their bounds;
    their raw rows are prefetched. Returns how many."""
    # the lanes whose bound beats the k-th, as a bit mask (a vector compare), then only those
    # are visited: no per-lane branch that mispredicts on ~1 lane in 10
    sel = np.uint32(0)
    for t in range(LANES):
        sel |= np.uint32(lbv[t] < lim) << np.uint32(t)
    nc = 0
    while sel != 0:
        t = trailing_zeros(sel)
        sel &= sel - np.uint32(1)
        i = np.int64(blk_rows[o + t])
        if i < 0 or is_live(alive, i) == 0:
            continue
        if has_mask and qmask[i] == 0:
            continue
        cand[nc] = i
        cand_lb[nc] = lbv[t]
        nc += 1
        for ln in range(0, raw.shape[1], 16):  # 64-byte lines
            prefetch(raw[i], ln)
    return nc


@njit(inline="always", cache=True)
def _rerank_block(
    q, qi, metric, cand, cand_lb, nc, lim, dedup, seen, has_pred, pred, stack, raw, best_d,
    best_i, cnt, k,
):  # fmt: skip
    """Exact re-rank of the candidates the k-th has not passed meanwhile (a row held by two
    lists once per query); returns (top-k count, k-th, rows re-ranked)."""
    n_rr = 0
    for c in range(nc):
        if cand_lb[c] >= lim:
            continue
        i = cand[c]
        if dedup:
            if seen[i] == qi + 1:
                continue
            seen[i] = qi + 1
        n_rr += 1
        if has_pred and not eval_exact(pred, i, stack):
            continue
        dd = l2sq(raw[i], q) if metric == METRIC_L2 else -dot(raw[i], q)
        cnt = heap_insert(best_d, best_i, cnt, k, dd, i)
        if cnt == k:
            lim = best_d[k - 1]
    return cnt, lim, n_rr


@njit(inline="always", cache=True)
def _merge_partitions(nvp, loc_n, loc_d, loc_i, best_d, best_i, k):
    """The query's top k from the per-partition tops; returns its count."""
    cnt = 0
    for s_ in range(nvp):
        for j in range(loc_n[s_]):
            cnt = heap_insert(best_d, best_i, cnt, k, loc_d[s_, j], loc_i[s_, j])
    return cnt


@njit(nogil=True, cache=True)
def search_batch_rq(
    queries,  # f32[Q, d]
    rqs,  # f32[Q, D] the queries after the index's shared rotation
    metric,  # METRIC_L2 / METRIC_IP
    order,  # i32[Q, W] lists by centroid distance
    nvisit,  # i32[Q]
    list_part,  # i32[L]
    lcent,  # f32[L, d] list centroids (the residual origins the codes were taken around)
    owned,  # u8[P]
    blk_ptr,  # i64[L + 1] list -> its blocks of 32 rows (fastscan.pack_blocks)
    blk_rows,  # i32[B * 32] lane -> row (-1: padding)
    blk_codes,  # u8[B, D/4 * 16] nibble-interleaved 1-bit codes
    blk_pc,  # u16[B * 32] set bits of each lane's code
    blk_fac,  # f32[4, B * 32] rabitq factors by lane (see rabitq.F_*)
    dedup,  # rows may sit in two lists (spill.py): re-rank each once per query
    alive,
    has_mask,
    qmask,
    raw,  # f32[N, d]
    pred,
    k,
    eps0,  # bound width: rows whose lower bound beats the current k-th are re-ranked
    out_pos,
    out_dist,
    out_cnt,
    stats,  # i64[Q, 5]: partitions, rows estimated, rows estimated, re-ranked, code bytes read
):
    """IVF scan with RaBitQ estimates: for each visited list, estimate every live (and quantized-
    filter-passing) row's distance from its 1-bit code, and compute the exact distance only where
    the estimate's lower bound (estimate - eps0 x error bound) is below the current k-th exact
    distance. With eps0 = 1.9 the bound holds for all but ~1e-3 of the rows, so within the visited
    lists the result is nearly exact; the visit plan alone sets the recall/speed trade-off.

    The k-th distance that decides re-ranking is kept per partition (a top k per visited
    partition, merged at the end): what a partition returns then never depends on which other
    partitions the same process searched, so a tree of holders returns exactly what one process
    does (the bound is probabilistic, unlike OSQ's, so a shared k-th would make them differ).

    A list is scanned in blocks of 32 rows (fastscan.py: one table lookup estimates 16 rows) and
    each block in two passes: the first keeps the rows whose lower bound beats the k-th at the
    block's start (prefetching their raw rows), the second re-ranks them in order, skipping
    those the k-th has passed meanwhile. That is exactly the set a single row-by-row pass
    re-ranks (the k-th only falls), with the memory latency of the raw rows hidden."""
    nq, d = queries.shape
    D = rqs.shape[1]
    u = np.empty(D, np.int64)
    lut = np.empty((D // 4, 16), np.uint8)
    acc = np.empty(LANES, np.int32)
    cand = np.empty(LANES, np.int64)
    cand_lb = np.empty(LANES, np.float32)
    lbv = np.empty(LANES, np.float32)
    f0, f1, f2, f3 = blk_fac[0], blk_fac[1], blk_fac[2], blk_fac[3]
    # spread of the query's rounding error on <b, rq>: D/2 set bits x uniform(+-delta/2) x 2
    qspread = 2.0 * np.sqrt(D / 24.0)
    nparts = owned.shape[0]
    done = np.zeros(nparts, dtype=np.uint8)
    slot = np.zeros(nparts, dtype=np.int64)
    loc_d = np.empty((nparts, k), dtype=np.float32)
    loc_i = np.empty((nparts, k), dtype=np.int64)
    loc_n = np.zeros(nparts, dtype=np.int64)
    stack = np.zeros(max(1, pred[0].shape[0]), dtype=np.bool_)
    # a row held by two lists (spill.py) is re-ranked once per query: the second time it is
    # either in the top k already or was worse than a k-th that has only fallen since
    seen = np.zeros(raw.shape[0] if dedup else 1, dtype=np.int32)
    has_pred = pred[0].shape[0] > 0
    for qi in range(nq):
        q = queries[qi]
        lo, delta, srq = rq_levels(rqs[qi], u)
        two = np.float32(2.0)
        query_lut(u, lut)
        qn = np.sqrt(dot(q, q))
        nv = nvisit[qi]
        for vi in range(nv):
            done[list_part[order[qi, vi]]] = 0
        nvp = 0
        for vi in range(nv):
            li = order[qi, vi]
            p = list_part[li]
            if owned[p] == 0:
                continue
            if done[p] == 0:
                done[p] = 1
                slot[p] = nvp
                loc_n[nvp] = 0
                nvp += 1
                stats[qi, 0] += 1
            best_d = loc_d[slot[p]]
            best_i = loc_i[slot[p]]
            cnt = loc_n[slot[p]]
            y2, ey, sc, eq = _list_terms(q, lcent[li], metric, eps0, qn, delta, qspread)
            n_est = 0
            n_rr = 0
            lim = best_d[k - 1] if cnt == k else np.float32(np.inf)
            for b in range(blk_ptr[li], blk_ptr[li + 1]):
                block_sums(blk_codes, b, lut, acc)
                o = b * LANES
                # every lane's lower bound at once (float32, branch-free: vectorized; one loop
                # per metric, as a test inside the loop kept it scalar: -12% kernel CPU at 50-d).
                # Written here, not as an inlined helper: as one, the kernel took ~20% more CPU
                if metric == METRIC_L2:
                    for t in range(LANES):
                        bpq = (
                            two * (delta * np.float32(acc[t]) + lo * np.float32(blk_pc[o + t]))
                            - srq
                        )
                        est = y2 + f0[o + t] - sc * f1[o + t] * (bpq - f2[o + t])
                        lbv[t] = est - ey * f3[o + t] - eq * f1[o + t]
                else:
                    for t in range(LANES):
                        bpq = (
                            two * (delta * np.float32(acc[t]) + lo * np.float32(blk_pc[o + t]))
                            - srq
                        )
                        est = y2 - f1[o + t] * bpq
                        lbv[t] = est - ey * f3[o + t] - eq * f1[o + t]
                if blk_rows[o + LANES - 1] >= 0:
                    n_est += LANES
                else:
                    for t in range(LANES):
                        n_est += blk_rows[o + t] >= 0
                nc = _block_candidates(
                    lbv, lim, o, blk_rows, alive, has_mask, qmask, raw, cand, cand_lb
                )
                cnt, lim, rr = _rerank_block(
                    q, qi, metric, cand, cand_lb, nc, lim, dedup, seen, has_pred, pred, stack, raw,
                    best_d, best_i, cnt, k,
                )  # fmt: skip
                n_rr += rr
            loc_n[slot[p]] = cnt
            stats[qi, 1] += n_est
            stats[qi, 2] += n_est
            stats[qi, 3] += n_rr
            stats[qi, 4] += (blk_ptr[li + 1] - blk_ptr[li]) * blk_codes.shape[1]
        out_cnt[qi] = _merge_partitions(nvp, loc_n, loc_d, loc_i, out_dist[qi], out_pos[qi], k)
