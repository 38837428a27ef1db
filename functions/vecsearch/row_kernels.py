"""Compiled (numba) per-row helpers every search kernel shares -- tombstone bit, exact
predicate, exact distance, running top k -- and the brute-force kernel made of them alone.

Why numba: the per-partition pipeline (Hamming prune -> cell lower bound -> exact re-rank) is a
sequence of data-dependent loops over a few thousand vectors per query; numpy would need many
small array calls per (query, partition) pair and lose to faiss on Python overhead alone.
All kernels are pure functions over flat arrays (no I/O, no Python objects) and release the GIL
(``nogil``) so a batch can be split over threads. The kernel modules: this one, filter_kernels
(masks), plan_kernels (visit plan), osq_kernels and rq_kernels (the scans), build_kernels.
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
def is_live(alive, i):
    """Row i's bit in the tombstone bitmap (1: live)."""
    return (alive[i >> 6] >> np.uint64(i & 63)) & np.uint64(1)


@njit(inline="always", cache=True)
def apply_op(op, stack, sp):
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
            sp = apply_op(op, stack, sp)
    return stack[0]


@njit(inline="always", cache=True)
def heap_insert(best_d, best_i, cnt, k, d, i):
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


@njit(inline="always", cache=True)
def kth_smallest(acc, ns, r, buf):
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
def exact_dist(raw, q, i, metric):
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
                    if is_live(alive, i) == 0:
                        continue
                    if has_pred and not eval_exact(pred, i, stack):
                        continue
                    dist = exact_dist(raw, q, i, metric)
                    cnt = heap_insert(best_d, best_i, cnt, k, dist, i)
        out_cnt[qi] = cnt
