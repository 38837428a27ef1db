"""Index build: balanced k-means partitions, then per partition a PCA rotation and an OSQ
quantizer; attributes quantized to 8-bit cells. A rich progress bar shows the stages."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import build_kernels, quantize, rabitq, spill
from .attributes import fit_attribute
from .index import METRICS, VecIndex, alive_all, attr_hist


def default_partitions(n: int, rows: int = 12_500) -> int:
    """About `rows` rows per partition, as a power of two (OSQ: 12.5k, 400k -> 32; RaBitQ:
    50k, 400k -> 8, since its re-rank threshold is kept per partition, see search_batch_rq)."""
    if n < 2000 or n < rows // 2:
        return 1
    return int(min(256, max(2, 2 ** round(math.log2(n / rows)))))


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :], 0.0)


LIST_ROWS = 100
QUANTIZERS = ("auto", "osq", "rabitq")


def pick_quantizer(quantizer: str, d: int) -> str:
    """ "auto" is RaBitQ at every dimension: measured on GloVe 50-d (50k base, CPU time, one
    thread) it reached recall 0.97 at 10.1k QPS where OSQ reached 0.968 at 4.2k, with fewer bytes
    (25.6 vs 33 B/vector); at 384 dims OSQ's d x d rotations and 4-byte sign codes cost even more.
    OSQ (per-partition PCA, 3.5 bits/dim) stays available as quantizer="osq"."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got '{quantizer}'")
    return "rabitq" if quantizer == "auto" else quantizer


def default_lists(n: int, n_partitions: int, rows: int = LIST_ROWS) -> int:
    """Lists per partition: about `rows` rows each (400k rows -> 32 x 125 = 4,000 lists in all).
    Fine lists are what lets the visit rule cover few rows: the nearest lists by centroid
    distance hold the neighbours far more tightly than coarse ones (IVF's lesson)."""
    return max(1, int(round(n / n_partitions / rows)))


def list_rows(kind: str, d: int) -> int:
    """Rows per list: 100, or 50 for RaBitQ from 128 dims. On 384-d MiniLM embeddings (13k
    bible verses) recall 0.95 needed 40% of the rows with 100-row lists and 27% with 50-row
    lists; scoring a list centroid costs about as much as estimating 8 rows there."""
    return 50 if kind == "rabitq" and d >= 128 else LIST_ROWS


def kmeans(x: np.ndarray, k: int, iters: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd k-means (lists inside a partition); returns (centroids, assignment)."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    c = x[rng.choice(len(x), k, replace=False)].copy()
    a = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        a = np.argmin(_sqdist(x, c), axis=1)
        for j in range(k):
            m = a == j
            c[j] = x[m].mean(0) if m.any() else x[rng.integers(len(x))]
    a = np.argmin(_sqdist(x, c), axis=1)
    return c.astype(np.float32), a


def balanced_kmeans(
    x: np.ndarray,
    k: int,
    iters: int = 12,
    balance_iters: int = 3,
    slack: float = 1.05,
    seed: int = 0,
    sample: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means on a sample, then capacity-constrained reassignment of all rows
    (each partition at most `slack` x n/k rows) with centroid refits."""
    rng = np.random.default_rng(seed)
    n = len(x)
    if k == 1:
        return x.mean(0, keepdims=True).astype(np.float32), np.zeros(n, dtype=np.int32)
    s = x if n <= sample else x[rng.choice(n, sample, replace=False)]
    c = s[rng.choice(len(s), k, replace=False)].copy()
    for _ in range(iters):
        a = np.argmin(_sqdist(s, c), axis=1)
        for j in range(k):
            m = a == j
            c[j] = s[m].mean(0) if m.any() else s[rng.integers(len(s))]
    cap = int(math.ceil(slack * n / k))
    assign = None
    for _ in range(balance_iters):
        assign = build_kernels.balanced_assign(_sqdist(x, c).astype(np.float32), cap)
        for j in range(k):
            m = assign == j
            if m.any():
                c[j] = x[m].mean(0)
    return c.astype(np.float32), assign


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ) as prog:
        yield prog


def build_index(
    vectors: np.ndarray,
    attrs: dict[str, Any] | None = None,
    ids: np.ndarray | None = None,
    labels: list[str] | None = None,
    metric: str = "l2",
    n_partitions: int | None = None,
    lists_per_partition: int | None = None,
    bits_per_dim: float = 3.5,
    sign_dims: int | None = None,
    seed: int = 0,
    progress: bool = False,
    quantizer: str = "auto",
    recall_target: float | None = 0.95,
    calibration_queries: int = 400,
    spill_lambda: float = spill.LAMBDA,
) -> VecIndex:
    """Build an index from vectors (n, d) and optional attribute columns {name: values}.

    `recall_target` (default 0.95; None skips it): after the build, held-out samples of the base
    rows are searched at growing effort until their recall@10 reaches the target; the measured
    curve is stored in the index, so searches need no hand-tuned coverage (and a query may ask
    for another target: `SearchParams.recall_target`).

    `spill_lambda` (RaBitQ only; 0 turns it off): each row is also scanned in a second list of
    its partition, chosen by SOAR's rule with this weight (spill.py)."""
    t0 = time.perf_counter()
    x, ids, sign_dims, kind = _checked(
        vectors, attrs or {}, ids, metric, bits_per_dim, sign_dims, quantizer, recall_target
    )
    n, d = x.shape
    attrs = attrs or {}
    P = n_partitions or default_partitions(n, 12_500 if kind == "osq" else 50_000)
    P = max(1, min(P, n))
    if metric == "cosine":
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(nrm == 0, 1, nrm)
    with _progress(progress) as prog:
        lpp = lists_per_partition or default_lists(n, P, list_rows(kind, d))
        lay = _layout(x, P, lpp, seed, prog)
        x, ids = x[lay.order], ids[lay.order]
        raw_in = (
            np.ascontiguousarray(vectors, dtype=np.float32)[lay.order] if metric != "cosine" else x
        )
        labels = [labels[i] for i in lay.order] if labels is not None else None
        task = prog.add_task(f"quantize ({kind})", total=P) if prog else None

        def tick() -> None:
            if prog:
                prog.update(task, advance=1)

        qarr, lcent = _quantize_vectors(kind, x, lay, bits_per_dim, sign_dims, seed, tick)
        task = prog.add_task("quantize attributes", total=max(1, len(attrs))) if prog else None
        specs, attrs_arr, acodes = _quantize_attrs(attrs, lay.order, n, prog, task)
    L = len(lcent)
    lstarts = np.concatenate([[0], np.cumsum(np.bincount(lay.lst, minlength=L))])
    ranges = np.stack([lstarts[:-1], lstarts[1:]], axis=1).astype(np.int64)
    idx = VecIndex(
        dims=d,
        metric=metric,
        bits_per_dim=float(bits_per_dim) if kind == "osq" else 1.0,
        attributes=specs,
        centroids=lay.centroids,
        list_centroids=lcent.astype(np.float16),
        list_part=lay.lpart,
        range_ptr=np.arange(L + 1, dtype=np.int64),
        ranges=ranges,
        quantizer=kind,
        **qarr,
        acodes=acodes,
        alive=alive_all(n),
        hist=attr_hist(lay.part.astype(np.int64), acodes, P),
        raw=np.ascontiguousarray(raw_in),
        attrs=np.ascontiguousarray(attrs_arr),
        ids=ids,
        labels=labels,
        build_info={
            "seconds": round(time.perf_counter() - t0, 3),
            "n": n,
            "partitions": P,
            "lists": L,
            "spill_lambda": float(spill_lambda) if kind == "rabitq" else 0.0,
        },
    )
    if recall_target is not None:
        from .calibrate import calibrate

        calibrate(idx, recall_target, n_queries=calibration_queries, seed=seed)
        idx.build_info["seconds"] = round(time.perf_counter() - t0, 3)
    return idx


@dataclass
class _Layout:
    """Where the rows go. Rows are stored sorted by (partition, list): `order` is the input row
    at each position, `part` and `lst` the partition and list of each stored row."""

    centroids: np.ndarray  # f32[P, d] partition centroids
    order: np.ndarray
    part: np.ndarray
    lst: np.ndarray
    lcent: np.ndarray  # f32[L, d] list centroids
    lpart: np.ndarray  # i32[L] partition of each list


def _layout(x: np.ndarray, P: int, lpp: int, seed: int, prog: Any) -> _Layout:
    """Balanced k-means partitions, then k-means lists inside each (the finer unit the visit
    rule prunes)."""
    task = prog.add_task("k-means partitions", total=1) if prog else None
    centroids, part = balanced_kmeans(x, P, seed=seed)
    if prog:
        prog.update(task, completed=1)
    task = prog.add_task("lists", total=P) if prog else None
    lst, list_centroids, list_part = _lists(x, part, P, lpp, seed, prog, task)
    order = np.lexsort((lst, part))
    lcent = np.asarray(list_centroids, dtype=np.float32).reshape(len(list_centroids), x.shape[1])
    lpart = np.asarray(list_part, dtype=np.int32)
    return _Layout(centroids, order, part[order], lst[order], lcent, lpart)


def _quantize_vectors(
    kind: str,
    x: np.ndarray,
    lay: _Layout,
    bits_per_dim: float,
    sign_dims: int,
    seed: int,
    tick: Callable[[], None],
) -> tuple[dict, np.ndarray]:
    """The quantizer's arrays for the stored rows `x`, and the list centroids as the search
    reads them."""
    if kind == "osq":
        P = len(lay.centroids)
        starts = np.concatenate([[0], np.cumsum(np.bincount(lay.part, minlength=P))])
        qarr = _quantize_osq(
            x, lay.lst, lay.lpart, lay.lcent, starts, bits_per_dim, sign_dims, seed, tick
        )
        return qarr, lay.lcent
    # codes are taken around the centroids as stored (float16), which the search reads
    lcent = lay.lcent.astype(np.float16).astype(np.float32)
    return _quantize_rabitq(x, lay.lst, lcent, len(lay.centroids), seed, tick), lcent


def _checked(
    vectors: np.ndarray,
    attrs: dict[str, Any],
    ids: np.ndarray | None,
    metric: str,
    bits_per_dim: float,
    sign_dims: int | None,
    quantizer: str,
    recall_target: float | None,
) -> tuple[np.ndarray, np.ndarray, int, str]:
    """The build's inputs checked (ValueError names the bad one): the vectors as contiguous
    float32, the ids (default 0..n-1), the sign dimensions and the quantizer kind."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"vectors must be a non-empty 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    n, d = x.shape
    if not 0 < bits_per_dim <= quantize.MAX_BITS:
        raise ValueError(f"bits_per_dim must be in (0, {quantize.MAX_BITS}], got {bits_per_dim}")
    for name, col in attrs.items():
        if len(col) != n:
            raise ValueError(f"attribute '{name}' has {len(col)} values for {n} vectors")
    if ids is None:
        ids = np.arange(n, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != n:
        raise ValueError("ids must be unique")
    sign_dims = min(d, quantize.MAX_SIGN_DIMS) if sign_dims is None else int(sign_dims)
    if not 0 < sign_dims <= min(d, quantize.MAX_SIGN_DIMS):
        raise ValueError(f"sign_dims must be in 1..{min(d, quantize.MAX_SIGN_DIMS)}")
    kind = pick_quantizer(quantizer, d)
    if recall_target is not None and not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    return x, ids, sign_dims, kind


def _lists(
    x: np.ndarray, part: np.ndarray, P: int, lpp: int, seed: int, prog: Any, task: Any
) -> tuple[np.ndarray, list, list]:
    """k-means lists inside each partition (at most ``lpp``; empty ones dropped): each row's
    list, and the lists' centroids and partitions."""
    n = len(x)
    lst = np.zeros(n, dtype=np.int64)
    list_centroids, list_part = [], []
    for p in range(P):
        rows = np.nonzero(part == p)[0]
        if len(rows) == 0:
            continue
        c, a = kmeans(x[rows], lpp, seed=seed + p)
        used = np.unique(a)
        remap = np.full(len(c), -1)
        remap[used] = np.arange(len(used)) + len(list_centroids)
        lst[rows] = remap[a]
        list_centroids += list(c[used])
        list_part += [p] * len(used)
        if prog:
            prog.update(task, advance=1)
    return lst, list_centroids, list_part


def _quantize_attrs(
    attrs: dict[str, Any], order: np.ndarray, n: int, prog: Any, task: Any
) -> tuple[list, np.ndarray, np.ndarray]:
    """Each attribute column in row order: its quantizer spec, the raw values and the codes."""
    specs, raw_attr = [], []
    for name, col in attrs.items():
        col = np.asarray(col)[order]
        spec, r = fit_attribute(name, col)
        specs.append(spec)
        raw_attr.append(r)
        if prog:
            prog.update(task, advance=1)
    attrs_arr = np.stack(raw_attr) if raw_attr else np.zeros((0, n), np.float64)
    acodes = (
        np.stack([sp.codes(attrs_arr[a]) for a, sp in enumerate(specs)])
        if specs
        else np.zeros((0, n), np.uint8)
    )
    return specs, attrs_arr, acodes


def _quantize_osq(x, lst, lpart, lcent, starts, bits_per_dim, sign_dims, seed, tick) -> dict:
    """Per partition: PCA rotation + OSQ cells (column-wise byte codes) + list-residual signs."""
    n, d = x.shape
    P = len(starts) - 1
    L = len(lcent)
    list_rc = np.zeros((L, d), dtype=np.float16)
    total_bits = int(round(bits_per_dim * d))
    nseg = quantize.nseg_for(total_bits)
    codes = np.zeros((nseg + 1, n), dtype=np.uint8)
    signs = np.zeros(n, dtype=np.uint32)
    rot = np.zeros((P, d, d), np.float32)
    means = np.zeros((P, d), np.float32)
    bits = np.zeros((P, d), np.uint8)
    bitoff = np.zeros((P, d), np.int32)
    bnd_off = np.zeros((P, d), np.int64)
    bnd_parts = []
    off = 0
    for p in range(P):
        s, e = starts[p], starts[p + 1]
        if e == s:
            q = quantize.fit_partition(x[:1], bits_per_dim, seed=seed)
        else:
            q = quantize.fit_partition(x[s:e], bits_per_dim, seed=seed + p)
            mine = np.nonzero(lpart == p)[0]
            list_rc[mine] = q.rotate(lcent[mine]).astype(np.float16)
            c, sg = quantize.encode(
                q, x[s:e], nseg, sign_dims, list_rc[lst[s:e]].astype(np.float32)
            )
            codes[:, s:e] = c
            signs[s:e] = sg
        rot[p], means[p], bits[p], bitoff[p] = q.rot, q.mean, q.bits, q.bitoff
        for a in range(d):
            bnd_off[p, a] = off
            bnd_parts.append(q.bounds[a])
            off += len(q.bounds[a])
        tick()
    return dict(
        nseg=nseg, sign_dims=sign_dims, list_rc=list_rc, rot=rot, means=means, bits=bits,
        bitoff=bitoff, bnd_off=bnd_off, bnd=np.concatenate(bnd_parts).astype(np.float32),
        codes=codes, signs=signs,
    )  # fmt: skip


def _quantize_rabitq(x, lst, lcent, P, seed, tick, chunk: int = 32768) -> dict:
    """One shared structured rotation; per row a 1-bit code of its list residual + 4 factors."""
    n, d = x.shape
    rot = rabitq.Rotation.random(d, seed=seed)
    codes = np.zeros((n, rot.dims // 8), np.uint8)
    fac = np.zeros((n, 4), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        codes[s:e], fac[s:e] = rabitq.encode(rot, x[s:e], lcent[lst[s:e]])
    for _ in range(P):
        tick()
    return dict(rq_flip=rot.flip, rq_perm=rot.perm, rq_codes=codes, rq_fac=fac, **empty_osq(P, n))


def empty_osq(P: int, n: int) -> dict:
    """The OSQ arrays of a RaBitQ index: present (one file format), empty."""
    return dict(
        nseg=0, sign_dims=0, list_rc=np.zeros((0, 0), np.float16),
        rot=np.zeros((P, 0, 0), np.float32), means=np.zeros((P, 0), np.float32),
        bits=np.zeros((P, 0), np.uint8), bitoff=np.zeros((P, 0), np.int32),
        bnd_off=np.zeros((P, 0), np.int64), bnd=np.zeros(0, np.float32),
        codes=np.zeros((1, 0), np.uint8), signs=np.zeros(0, np.uint32),
    )  # fmt: skip
