"""Query: plan the partitions to visit (one pass), search the owned partitions with the compiled
pipeline, merge top-k. The same functions serve the in-process path and every tree node.

Visit rule (SQUASH): lists in order of centroid distance, while the list is within `ratio` x the
nearest centroid distance OR fewer than `min_candidates` rows passing the quantized filter (a
superset of the true matches) have been covered. If the pass still
returns fewer than k results while more rows match, those queries are answered by the exact path,
so a query always returns min(k, #matching) results.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import filter_kernels, osq_kernels, plan_kernels, row_kernels, rq_kernels
from .calibrate import index_effort
from .index import VecIndex
from .predicates import Program, QueryError, compile_filter

MAX_K = 10_000


@dataclass
class SearchParams:
    ratio: float = 1.0  # distance criterion: x nearest centroid distance
    # count criterion: cover this fraction of the live rows; None -> from the index's calibration
    # for `recall_target` (0 -> the target the index was built for), 0.08 without calibration
    coverage: float | None = None
    recall_target: float = 0.0
    min_candidates: int = 0  # 0 -> 20 * k rows that may match the filter
    keep_frac: float = 0.5  # Hamming prune: keep this fraction (by sign-bit distance)
    filter_keep_frac: float = 1.0  # the same with a filter (the mask already thinned the rows)
    min_keep: int = 0  # 0 -> 4 * k
    rerank: int = 0  # 0 -> 2 * k candidates per partition re-ranked exactly
    filter_coverage: float = 0.5  # filtered: cover this x as many filter-passing rows
    max_visit: int = 0  # 0 -> no cap
    threads: int = 0  # 0 -> min(2, cpus)

    eps0: float = 1.9  # RaBitQ: width of the error bound that decides what is re-ranked

    def resolved(self, k: int, index: VecIndex | None = None) -> SearchParams:
        coverage = self.coverage
        if coverage is None:
            coverage = index_effort(index, self.recall_target) if index is not None else 0.08
        return SearchParams(
            ratio=self.ratio,
            coverage=coverage,
            recall_target=self.recall_target,
            eps0=self.eps0,
            min_candidates=self.min_candidates or 20 * k,
            filter_coverage=self.filter_coverage,
            keep_frac=self.keep_frac,
            filter_keep_frac=self.filter_keep_frac,
            min_keep=self.min_keep or 4 * k,
            rerank=self.rerank or 2 * k,
            max_visit=self.max_visit,
            threads=self.threads or min(2, os.cpu_count() or 1),
        )


@dataclass
class Request:
    """A validated query batch, in the index's metric space."""

    queries: np.ndarray  # f32[Q, d]
    k: int
    program: Program
    metric_code: int
    exact: bool
    metric: str
    filter: Any = None


@dataclass
class Result:
    ids: np.ndarray  # i64[Q, k] (-1 = empty slot)
    dists: np.ndarray  # f32[Q, k]
    counts: np.ndarray  # i64[Q]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(
        self, labels: list[str] | None = None, index: VecIndex | None = None
    ) -> list[dict[str, Any]]:
        out = []
        for q in range(len(self.counts)):
            c = int(self.counts[q])
            row: dict[str, Any] = {
                "ids": self.ids[q, :c].tolist(),
                "distances": [float(v) for v in self.dists[q, :c]],
            }
            out.append(row)
        return out


def make_request(
    index: VecIndex,
    vectors: Any,
    k: Any = 10,
    flt: Any = None,
    metric: Any = None,
    exact: Any = False,
) -> Request:
    """Validate a query batch; every problem raises QueryError naming the field."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= MAX_K:
        raise QueryError(f"k: expected an integer in 1..{MAX_K}, got {k!r}")
    metric = index.metric if metric is None else metric
    allowed = ("cosine",) if index.metric == "cosine" else ("l2", "ip")
    if metric not in allowed:
        raise QueryError(
            f"metric: '{metric}' is not available on an index built for '{index.metric}' (use one of {list(allowed)})"
        )
    if not isinstance(exact, bool):
        raise QueryError(f"exact: expected true/false, got {exact!r}")
    try:
        q = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise QueryError(f"vectors: expected a list of numeric vectors ({e})") from e
    if q.ndim == 1 and q.size:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0:
        raise QueryError(f"vectors: expected a non-empty list of vectors, got shape {q.shape}")
    if q.shape[1] != index.dims:
        raise QueryError(
            f"vectors: wrong dimension {q.shape[1]}, the index has {index.dims} dimensions"
        )
    if not np.isfinite(q).all():
        raise QueryError("vectors: contain NaN or infinite values")
    program = compile_filter(flt, index.attributes)
    return Request(
        queries=index.to_metric_space(q),
        k=int(k),
        program=program,
        metric_code=row_kernels.METRIC_IP if metric == "ip" else row_kernels.METRIC_L2,
        exact=exact,
        metric=metric,
        filter=flt,
    )


def plan(
    index: VecIndex, req: Request, params: SearchParams, qmask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Visit order (lists by centroid distance) and how many to visit, per query."""
    prm = params.resolved(req.k, index)
    c = index.list_centroids.astype(np.float32)  # held as float16 (1 B/vector at 100 rows/list)
    q = req.queries
    gram = np.empty((len(q), len(c)), dtype=np.float32)
    plan_kernels.gram(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(c), gram)
    sizes = np.zeros(index.n_lists, dtype=np.int64)
    plan_kernels.list_counts(
        index.range_ptr, index.ranges, index.alive, False, np.zeros(1, np.uint8), sizes
    )
    base_rows = max(prm.min_candidates, int(prm.coverage * sizes.sum()))
    if qmask is None:
        cnt = sizes
    else:
        # "enough filter-matching candidates": as many rows passing the (superset) filter as
        # the unfiltered pass would examine in all, so a selective or vector-correlated filter
        # keeps going past the distance criterion until its matches are covered as densely
        cnt = np.zeros(index.n_lists, dtype=np.int64)
        plan_kernels.list_counts(index.range_ptr, index.ranges, index.alive, True, qmask, cnt)
    L = index.n_lists
    m_guess = 5 * base_rows * L // max(1, 4 * int(sizes.sum())) + 16
    qq = (q * q).sum(1).astype(np.float32)
    cc = (c * c).sum(1).astype(np.float32)
    if req.metric_code == row_kernels.METRIC_IP:
        # inner product: lists by decreasing q.c (2 (max q.c - q.c) >= 0 keeps the kernel's
        # arithmetic; the distance-ratio rule then keeps only the best list, the count rule rules)
        qq = 2 * gram.max(axis=1) if gram.shape[1] else qq
        cc = np.zeros_like(cc)

    def run(rows: np.ndarray | slice, width: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.zeros((len(qq[rows]), width), dtype=np.int32)
        nvisit = np.zeros(len(order), dtype=np.int32)
        plan_kernels.plan_lists(
            np.ascontiguousarray(gram[rows]), qq[rows], cc, cnt, sizes, float(prm.ratio),
            base_rows, qmask is not None, float(prm.filter_coverage), int(prm.max_visit),
            int(m_guess), order, nvisit,
        )  # fmt: skip
        return order, nvisit

    # a narrow output first (the unfiltered plan needs about m_guess lists); queries whose
    # rules need more (selective or correlated filters) are planned again at full width
    order, nvisit = run(slice(None), min(L, 2 * m_guess))
    wide = np.nonzero(nvisit < 0)[0]
    if len(wide):
        o2, n2 = run(wide, L)
        width = int(n2.max())
        if width > order.shape[1]:
            order = np.pad(order, ((0, 0), (0, width - order.shape[1])))
        order[wide] = o2[:, : order.shape[1]]
        nvisit[wide] = n2
    width = int(nvisit.max()) if len(nvisit) else 0
    return np.ascontiguousarray(order[:, :width]), nvisit


def quantized_mask(index: VecIndex, program: Program) -> np.ndarray | None:
    if program.empty:
        return None
    out = np.empty(index.n_rows, dtype=np.uint8)
    filter_kernels.quantized_mask(
        program.prog, program.leaf_attr, program.allowed, index.acodes, index.alive, out
    )
    return out


def exact_mask(index: VecIndex, program: Program) -> np.ndarray:
    out = np.empty(index.n_rows, dtype=np.uint8)
    filter_kernels.exact_mask((*program.exact_args(), index.attrs), index.alive, out)
    return out.astype(bool)


def segment_order(index: VecIndex) -> np.ndarray:
    """Per partition, dimensions by bit offset (zero-bit ones last): the order in which the
    kernel folds them into its per-segment tables."""
    key = np.where(index.bits > 0, index.bitoff, np.iinfo(np.int32).max)
    return np.argsort(key, axis=1, kind="stable").astype(np.int32)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A long-lived pool per thread count: starting one per batch cost ~0.28 ms, about 6 % of a
    300-query GloVe batch at 2 threads. Dropped in a forked child (its threads do not survive)."""
    with _POOLS_LOCK:
        ex = _POOLS.get(threads)
        if ex is None:
            ex = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="vecsearch")
        return ex


os.register_at_fork(after_in_child=_POOLS.clear)


def _chunks(n: int, parts: int) -> list[slice]:
    step = -(-n // parts)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def search_owned(
    index: VecIndex,
    req: Request,
    owned: np.ndarray,
    params: SearchParams,
    order: np.ndarray | None = None,
    nvisit: np.ndarray | None = None,
    exact: bool | None = None,
) -> Result:
    """Search the partitions marked in `owned` (u8[P]); returns external ids and distances."""
    prm = params.resolved(req.k, index)
    exact = req.exact if exact is None else exact
    Q, k = len(req.queries), req.k
    pos = np.full((Q, k), -1, dtype=np.int64)
    dist = np.full((Q, k), np.inf, dtype=np.float32)
    cnt = np.zeros(Q, dtype=np.int64)
    stats = np.zeros((Q, 5), dtype=np.int64)
    owned = np.ascontiguousarray(owned, dtype=np.uint8)
    qmask = None if exact else quantized_mask(index, req.program)
    planned = order is not None and nvisit is not None
    p = req.program
    rq = index.quantizer == "rabitq"
    dim_order = None if rq else segment_order(index)
    keep = prm.keep_frac if req.program.empty else prm.filter_keep_frac
    if rq and not exact:
        lcent = index.list_centroids.astype(np.float32)
        blk = index.scan_blocks()

    def run(sl: slice) -> None:
        """One thread's share of the batch: its visit plan (unless the caller gave one), its
        rotation and its scan, all in compiled code that releases the GIL."""
        if exact:
            row_kernels.exact_batch(
                req.queries[sl], req.metric_code, index.list_part, owned, index.range_ptr, index.ranges, index.alive, index.raw,
                (*p.exact_args(), index.attrs), k, pos[sl], dist[sl], cnt[sl],
            )  # fmt: skip
            return
        if planned:
            o, nv = order[sl], nvisit[sl]
        else:
            o, nv = plan(index, replace(req, queries=req.queries[sl]), prm, qmask)
        if rq:
            rqs = index.rotation().apply(req.queries[sl])
            rq_kernels.search_batch_rq(
                req.queries[sl], rqs, req.metric_code, o, nv, index.list_part, lcent, owned,
                blk["blk_ptr"], blk["blk_rows"], blk["blk_codes"], blk["blk_pc"], blk["blk_fac"], index.spilled, index.alive, qmask is not None,
                qmask if qmask is not None else np.zeros(1, np.uint8), index.raw, (*p.exact_args(), index.attrs), k,
                float(prm.eps0), pos[sl], dist[sl], cnt[sl], stats[sl],
            )  # fmt: skip
        else:
            osq_kernels.search_batch(
                req.queries[sl], req.metric_code, o, nv, index.list_part, index.list_rc.astype(np.float32), owned, index.rot, index.means, index.bits,
                index.bitoff, dim_order, index.bnd_off, index.bnd, index.range_ptr, index.ranges, index.codes, index.signs,
                index.sign_dims, index.alive, qmask is not None,
                qmask if qmask is not None else np.zeros(1, np.uint8), index.raw, (*p.exact_args(), index.attrs), k,
                keep, prm.min_keep, prm.rerank, pos[sl], dist[sl], cnt[sl], stats[sl],
            )  # fmt: skip

    threads = min(prm.threads, max(1, Q // 8))
    if threads > 1:
        list(_pool(threads).map(run, _chunks(Q, threads)))
    else:
        run(slice(0, Q))
    ids = np.where(pos >= 0, np.asarray(index.ids)[np.maximum(pos, 0)], -1)
    if req.metric == "cosine":
        dist = np.where(np.isfinite(dist), dist / 2, dist)  # |a-b|^2 / 2 = 1 - cos for unit vectors
    st = {
        "partitions_visited": int(stats[:, 0].sum()),
        "rows_hamming": int(stats[:, 1].sum()),
        "rows_lower_bound": int(stats[:, 2].sum()),
        "rows_reranked": int(stats[:, 3].sum()),
        "cell_lookups": int(stats[:, 4].sum()),
    }
    return Result(ids=ids, dists=dist, counts=cnt, stats=st)


def merge(results: list[Result], k: int) -> Result:
    """Merge partial top-k lists (disjoint partitions) into one top-k per query."""
    if len(results) == 1:
        return results[0]
    ids = np.concatenate([r.ids for r in results], axis=1)
    dists = np.concatenate([r.dists for r in results], axis=1)
    dists = np.where(ids < 0, np.inf, dists)
    o = np.argsort(dists, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, o, axis=1)
    dists = np.take_along_axis(dists, o, axis=1)
    counts = np.minimum(sum(r.counts for r in results), k)
    st: dict[str, Any] = {}
    for r in results:
        for key, v in r.stats.items():
            if isinstance(v, int | float):
                st[key] = st.get(key, 0) + v
    return Result(ids=ids, dists=dists, counts=counts, stats=st)


def search(
    index: VecIndex,
    vectors: Any,
    k: int = 10,
    flt: Any = None,
    metric: str | None = None,
    exact: bool = False,
    params: SearchParams | None = None,
) -> Result:
    """In-process search over the whole index (single holder)."""
    req = make_request(index, vectors, k, flt, metric, exact)
    owned = np.ones(index.n_partitions, dtype=np.uint8)
    params = params or SearchParams()
    res = search_owned(index, req, owned, params)
    return complete(
        index, req, res, lambda sub: search_owned(index, sub, owned, params, exact=True)
    )


def complete(index: VecIndex, req: Request, res: Result, run_exact: Any) -> Result:
    """Guarantee min(k, #matching): queries that came back short are re-answered exactly."""
    short = np.nonzero(res.counts < req.k)[0]
    res.stats["exact_fallback"] = 0
    if req.exact or len(short) == 0:
        return res
    n_match = int(exact_mask(index, req.program).sum()) if not req.program.empty else index.n_live
    short = short[res.counts[short] < min(req.k, n_match)]
    if len(short) == 0:
        return res
    sub = Request(
        req.queries[short], req.k, req.program, req.metric_code, True, req.metric, req.filter
    )
    fix = run_exact(sub)
    res.ids[short], res.dists[short], res.counts[short] = fix.ids, fix.dists, fix.counts
    res.stats["exact_fallback"] = len(short)
    return res
