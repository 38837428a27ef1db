"""vecsearch core: build + query on a real GloVe subset (20k base rows, 150 held-out queries).

Ground truth is brute force in numpy; attributes are real (frequency rank, word length) plus a
uniform random one. These tests assert correctness properties, not speed."""

from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
from hearth.functions.vecsearch import build, calibrate, data, quantize, query, rabitq, storage
from hearth.functions.vecsearch.predicates import QueryError, compile_filter
from hearth.functions.vecsearch.query import SearchParams

K = 10
N_BASE = 20_000
N_Q = 150


@pytest.fixture(scope="module")
def split():
    return data.glove_split(N_BASE, N_Q, seed=7)


@pytest.fixture(scope="module")
def index(split):
    """The default build: RaBitQ codes, calibrated for recall 0.95."""
    return build.build_index(
        split.base, split.attrs, ids=split.base_ids, labels=split.words, n_partitions=4
    )


@pytest.fixture(scope="module")
def osq_index(split):
    return build.build_index(
        split.base,
        split.attrs,
        ids=split.base_ids,
        labels=split.words,
        n_partitions=4,
        bits_per_dim=3.5,
        quantizer="osq",
    )


def ids_of(split, rows: np.ndarray) -> np.ndarray:
    return np.where(rows >= 0, split.base_ids[np.maximum(rows, 0)], -1)


def exact_np(split, flt) -> np.ndarray:
    """The predicate evaluated independently in numpy on the original attribute columns."""
    if flt is None:
        return np.ones(len(split.base), bool)
    if "and" in flt:
        return np.logical_and.reduce([exact_np(split, f) for f in flt["and"]])
    if "or" in flt:
        return np.logical_or.reduce([exact_np(split, f) for f in flt["or"]])
    col = split.attrs[flt["attr"]]
    m = np.ones(len(col), bool)
    for op, v in flt.items():
        if op == "attr":
            continue
        if op == "lt":
            m &= col < v
        elif op == "le":
            m &= col <= v
        elif op == "gt":
            m &= col > v
        elif op == "ge":
            m &= col >= v
        elif op == "eq":
            m &= col == v
        elif op == "in":
            m &= np.isin(col, v)
        else:
            m &= (col >= v[0]) & (col <= v[1])
    return m


FILTERS = {
    "uniform_8pct": {"attr": "u", "lt": 80},
    "correlated_rank": {"attr": "rank", "lt": 1700},
    "len_in": {"attr": "len", "in": [4, 5]},
    "and": {"and": [{"attr": "rank", "lt": 10000}, {"attr": "len", "in": [4, 5]}]},
    "or": {"or": [{"attr": "u", "eq": 3}, {"attr": "len", "ge": 12}]},
    "nested": {
        "or": [
            {"and": [{"attr": "u", "between": [100, 140]}, {"attr": "len", "le": 6}]},
            {"attr": "rank", "lt": 300},
        ]
    },
    "tiny": {"attr": "rank", "lt": 40},  # fewer matches in the base than k for some splits
    "none_match": {"attr": "len", "gt": 1000},
}


def test_unfiltered_recall_and_full_results(index, split):
    truth, _ = data.brute_force(split.base, split.queries, K)
    res = query.search(index, split.queries, K)
    assert (res.counts == K).all()
    r = data.recall(res.ids, ids_of(split, truth))
    assert r >= 0.85, r


def test_exact_mode_is_brute_force(index, split):
    truth, tdist = data.brute_force(split.base, split.queries, K)
    res = query.search(index, split.queries, K, exact=True)
    assert data.recall(res.ids, ids_of(split, truth)) == 1.0
    np.testing.assert_allclose(res.dists, tdist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FILTERS))
def test_filtered_no_violations_and_min_k(index, split, name):
    flt = FILTERS[name]
    mask = exact_np(split, flt)
    res = query.search(index, split.queries, K, flt=flt)
    id_ok = set(split.base_ids[mask].tolist())
    for q in range(N_Q):
        got = res.ids[q, : res.counts[q]]
        assert set(got.tolist()) <= id_ok, f"predicate violated for query {q}"
        assert len(set(got.tolist())) == len(got)
    assert (res.counts == min(K, int(mask.sum()))).all()
    if mask.sum() >= 200:
        truth, _ = data.brute_force(split.base, split.queries, K, mask=mask)
        r = data.recall(res.ids, ids_of(split, truth))
        assert r >= 0.8, (name, r)


@pytest.mark.parametrize("name", list(FILTERS))
def test_exact_filtered_equals_brute_force(index, split, name):
    mask = exact_np(split, FILTERS[name])
    truth, _ = data.brute_force(split.base, split.queries[:20], K, mask=mask)
    res = query.search(index, split.queries[:20], K, flt=FILTERS[name], exact=True)
    assert data.recall(res.ids, ids_of(split, truth)) == 1.0


def test_quantized_mask_contains_exact_mask(index, split):
    rng = np.random.default_rng(1)
    ops = ["lt", "le", "gt", "ge", "eq", "in", "between"]
    for _ in range(300):
        leaves = []
        for _ in range(rng.integers(1, 4)):
            attr = str(rng.choice(["rank", "len", "u"]))
            col = split.attrs[attr]
            op = str(rng.choice(ops))
            v = int(rng.choice(col)) + int(rng.integers(-2, 3))
            if op == "in":
                leaves.append({"attr": attr, "in": [int(x) for x in rng.choice(col, 3)]})
            elif op == "between":
                leaves.append({"attr": attr, "between": sorted([v, int(rng.choice(col))])})
            else:
                leaves.append({"attr": attr, op: v})
        flt = leaves[0] if len(leaves) == 1 else {str(rng.choice(["and", "or"])): leaves}
        prog = compile_filter(flt, index.attributes)
        qm = query.quantized_mask(index, prog).astype(bool)
        em = query.exact_mask(index, prog)
        assert not (em & ~qm).any(), f"quantized mask dropped a true match for {flt}"
        # exact mask in index row order equals numpy's on the original columns
        row_of = {int(i): r for r, i in enumerate(index.ids)}
        want = np.zeros(index.n_rows, bool)
        want[[row_of[int(i)] for i in split.base_ids[exact_np(split, flt)]]] = True
        assert (em == want).all(), flt


@pytest.mark.parametrize("quantizer", ["osq", "rabitq"])
def test_cosine_and_inner_product(split, quantizer):
    base, qs = split.base[:5000], split.queries[:30]
    for metric in ("cosine", "ip"):
        idx = build.build_index(base, n_partitions=2, metric=metric, quantizer=quantizer)
        truth, _ = data.brute_force(base, qs, K, metric=metric)
        ex = query.search(idx, qs, K, exact=True)
        assert data.recall(ex.ids, truth) == 1.0
        approx = query.search(idx, qs, K, params=SearchParams(coverage=0.3, keep_frac=0.5))
        assert data.recall(approx.ids, truth) >= 0.85, metric
        # with every list visited and no Hamming prune the bounds alone decide: ip's per-cell
        # bounds can be negative, so early abandoning must still never drop a true neighbour
        full = query.search(idx, qs, K, params=SearchParams(coverage=1.0, keep_frac=1.0))
        assert data.recall(full.ids, truth) >= 0.97, metric
    idx = build.build_index(base, n_partitions=2, metric="l2")
    truth, _ = data.brute_force(base, qs, K, metric="ip")
    assert data.recall(query.search(idx, qs, K, metric="ip", exact=True).ids, truth) == 1.0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"vectors": [[0.0] * 49]}, "wrong dimension 49"),
        ({"vectors": []}, "vectors"),
        ({"vectors": [["a"] * 50]}, "vectors"),
        ({"flt": {"attr": "price", "lt": 3}}, "unknown attribute 'price'"),
        ({"flt": {"attr": "rank", "lesser": 3}}, "unknown operator 'lesser'"),
        ({"flt": {"and": {"attr": "rank", "lt": 3}}}, "filter.and: expected a non-empty list"),
        ({"flt": {"and": [{"attr": "rank", "lt": "x"}]}}, "filter.and[0].lt: expected a number"),
        ({"flt": {"attr": "rank"}}, "has no operator"),
        ({"flt": {"attr": "len", "in": []}}, "filter.in: expected a non-empty list"),
        ({"flt": [1, 2]}, "filter: expected an object"),
        ({"flt": {"not": {"attr": "rank", "lt": 3}}}, "expected 'and', 'or' or a leaf"),
        ({"k": 0}, "k: expected an integer"),
        ({"metric": "cosine"}, "metric: 'cosine' is not available"),
        ({"exact": "yes"}, "exact: expected true/false"),
    ],
)
def test_bad_queries_name_the_problem(index, kwargs, needle):
    args = {"vectors": [[0.1] * 50], "k": 10, "flt": None, "metric": None, "exact": False} | kwargs
    with pytest.raises(QueryError) as e:
        query.make_request(
            index, args["vectors"], args["k"], args["flt"], args["metric"], args["exact"]
        )
    assert needle in str(e.value)


def test_file_roundtrip_and_errors(osq_index, split, tmp_path):
    index = osq_index
    path = tmp_path / "glove.hvx"
    storage.save(index, path)
    loaded = storage.load(path)
    a = query.search(index, split.queries[:20], K, flt=FILTERS["and"])
    b = query.search(loaded, split.queries[:20], K, flt=FILTERS["and"])
    assert (a.ids == b.ids).all()
    assert loaded.labels[:5] == index.labels[:5]
    assert loaded.bytes_per_vector() == pytest.approx(index.bytes_per_vector())
    blob = path.read_bytes()
    h = storage.read_header(path)

    def write(name: str, content: bytes):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    cases = {
        "bad magic": (write("m.hvx", b"NOTANIDX" + blob[8:]), "bad magic"),
        "version": (
            write("v.hvx", blob[:8] + struct.pack("<I", 99) + blob[12:]),
            "unsupported index format version 99",
        ),
        "version 2": (
            write("v2.hvx", blob[:8] + struct.pack("<I", 2) + blob[12:]),
            "unsupported index format version 2 (this build reads version 3); rebuild",
        ),
        "version 1": (
            write("v1.hvx", blob[:8] + struct.pack("<I", 1) + blob[12:]),
            "unsupported index format version 1 (this build reads version 3); rebuild",
        ),
        "truncated": (write("t.hvx", blob[: len(blob) // 2]), "truncated: array"),
        "short": (write("s.hvx", b"HEA"), "too short"),
        "header": (write("h.hvx", blob[:30] + b"X" + blob[31:]), "header checksum mismatch"),
    }
    off = h["arrays"]["codes"]["offset"] + 5
    corrupt = bytearray(blob)
    corrupt[off] ^= 0xFF
    cases["codes"] = (write("c.hvx", bytes(corrupt)), "checksum mismatch in array 'codes'")
    # a code layout the byte-table kernel cannot read (valid checksums, shifted bit offsets)
    bad = storage.load(path)
    bad.bitoff = bad.bitoff.copy()
    bad.bitoff[0, int(np.argmax(bad.bits[0]))] += 1
    storage.save(bad, tmp_path / "b.hvx")
    cases["layout"] = (tmp_path / "b.hvx", "partition 0: dimension")
    cases["missing"] = (tmp_path / "nope.hvx", "no such index file")
    cases["dir"] = (tmp_path, "is a directory")
    for label, (p, needle) in cases.items():
        with pytest.raises(storage.IndexFormatError) as e:
            storage.load(p)
        assert needle in str(e.value), (label, str(e.value))


def test_inserts_and_deletes_without_rebuild(split, tmp_path):
    idx = build.build_index(
        split.base[:8000],
        {k: v[:8000] for k, v in split.attrs.items()},
        ids=split.base_ids[:8000],
        n_partitions=2,
        quantizer="osq",  # RaBitQ updates: test_rabitq_roundtrip_inserts_deletes
    )
    qs = split.queries[:20]
    before = query.search(idx, qs, K)
    # delete every returned neighbour of the first 5 queries: they must never come back
    gone = np.unique(before.ids[:5])
    assert idx.delete(gone) == len(gone)
    assert idx.delete(gone) == 0
    after = query.search(idx, qs, K)
    assert not set(after.ids.ravel().tolist()) & set(gone.tolist())
    assert (after.counts == K).all()
    ex = query.search(idx, qs, K, exact=True)
    assert not set(ex.ids.ravel().tolist()) & set(gone.tolist())
    # insert the held-out queries themselves: each must now find itself first, distance 0
    new_ids = np.arange(10_000_000, 10_000_000 + len(qs))
    attrs = {"rank": np.full(len(qs), 5), "len": np.full(len(qs), 99), "u": np.full(len(qs), 7)}
    idx.insert(qs, attrs, ids=new_ids)
    res = query.search(idx, qs, K)
    assert (res.ids[:, 0] == new_ids).all()
    np.testing.assert_allclose(res.dists[:, 0], 0, atol=1e-4)
    # and the new rows obey filters on their attributes
    f = query.search(idx, qs, K, flt={"attr": "len", "eq": 99})
    assert (f.counts == K).all() and set(f.ids.ravel().tolist()) == set(new_ids.tolist())
    with pytest.raises(ValueError, match="ids already present"):
        idx.insert(qs[:1], {k: v[:1] for k, v in attrs.items()}, ids=new_ids[:1])
    with pytest.raises(ValueError, match="missing attribute"):
        idx.insert(qs[:1], {"rank": [1]})
    # the updated index survives a save/load cycle
    storage.save(idx, tmp_path / "u.hvx")
    again = storage.load(tmp_path / "u.hvx")
    res2 = query.search(again, qs, K)
    assert (res2.ids == res.ids).all()
    assert again.n_live == idx.n_live == 8000 - len(gone) + len(qs)


def test_build_rejects_bad_input(split):
    with pytest.raises(ValueError, match="non-empty 2-D"):
        build.build_index(np.zeros((0, 50), np.float32))
    bad = split.base[:100].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build.build_index(bad)
    with pytest.raises(ValueError, match="attribute 'x' has 5 values for 100"):
        build.build_index(split.base[:100], {"x": [1, 2, 3, 4, 5]})


def test_memory_budget(osq_index):
    index = osq_index
    # 3.5 bits/dim -> 22 code bytes + 4 sign bytes + 3 attribute bytes + amortised quantizers
    # and lists (the 400k GloVe index: 34.0 B/vector, see docs/vecsearch.md)
    mem = index.memory_bytes()
    assert mem["codes"] == 22 * index.n_rows
    assert mem["signs"] == 4 * index.n_rows
    assert index.bytes_per_vector() <= 36


@pytest.mark.parametrize("bits_per_dim", [0.5, 1, 2, 3.5, 4, 8])
def test_codes_are_byte_aligned(split, bits_per_dim):
    q = quantize.fit_partition(split.base[:3000], bits_per_dim)
    budget = int(round(bits_per_dim * 50))
    nseg = quantize.nseg_for(budget)
    assert quantize.check_byte_packing(q.bits, q.bitoff, nseg) is None
    for a, (w, o) in enumerate(zip(q.bits.tolist(), q.bitoff.tolist(), strict=True)):
        assert w == 0 or (o & 7) + w <= 8, (a, w, o)
    # nothing lost where widths pair up into bytes; never more than the budget
    assert int(q.bits.sum()) <= budget
    if bits_per_dim in (0.5, 1, 2, 3.5, 8):
        assert int(q.bits.sum()) == budget
    # the highest-variance dimension sits in segment 0 (early abandoning sees it first)
    assert q.bitoff[0] >> 3 == 0
    # codes round-trip: unpack each dimension from its byte and compare with the cells
    x = split.base[:500]
    codes, _ = quantize.encode(q, x, nseg, 32)
    cells = q.cells(q.rotate(x))
    for a in range(50):
        w, o = int(q.bits[a]), int(q.bitoff[a])
        if w:
            got = (codes[o >> 3].astype(np.int64) >> (o & 7)) & ((1 << w) - 1)
            assert (got == cells[:, a]).all(), a


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_bounds_never_drop_a_neighbour(split, metric):
    # every list visited, no Hamming prune, every row whose bound is below the k-th distance
    # re-ranked: the result must be exact, so no bound (segment tables, early abandoning,
    # seeding) ever exceeded a true distance
    base, qs = split.base[:4000], split.queries[:25]
    idx = build.build_index(base, n_partitions=2, metric=metric, quantizer="osq")
    truth, _ = data.brute_force(base, qs, K, metric=metric)
    prm = SearchParams(coverage=1.0, keep_frac=1.0, rerank=len(base))
    assert data.recall(query.search(idx, qs, K, params=prm).ids, truth) == 1.0


def _plan_reference(index, req, prm, qmask):
    """The visit rules written plainly: full sort of every list, then walk."""
    c = index.list_centroids.astype(np.float32)
    q = req.queries
    d2 = np.maximum((q * q).sum(1)[:, None] - 2 * q @ c.T + (c * c).sum(1)[None, :], 0)
    sizes = np.array(
        [
            (
                index.ranges[index.range_ptr[i] : index.range_ptr[i + 1], 1]
                - index.ranges[index.range_ptr[i] : index.range_ptr[i + 1], 0]
            ).sum()
            for i in range(index.n_lists)
        ]
    )
    cnt = (
        sizes
        if qmask is None
        else np.array(
            [
                sum(
                    int(qmask[s:e].sum())
                    for s, e in index.ranges[index.range_ptr[i] : index.range_ptr[i + 1]]
                )
                for i in range(index.n_lists)
            ]
        )
    )
    base_rows = max(prm.min_candidates, int(prm.coverage * sizes.sum()))
    out = []
    for qi in range(len(q)):
        o = np.argsort(d2[qi], kind="stable")
        dist = np.sqrt(d2[qi, o])
        within = int((dist <= prm.ratio * dist[0] + 1e-9).sum())
        need = base_rows
        if qmask is not None:
            need = int(prm.filter_coverage * max(int(sizes[o[:within]].sum()), base_rows))
        before = np.cumsum(cnt[o]) - cnt[o]
        out.append((o, max(within, int((before < need).sum()))))
    return out


@pytest.mark.parametrize("flt", [None, {"attr": "rank", "lt": 1700}, {"attr": "u", "lt": 80}])
@pytest.mark.parametrize("ratio, coverage", [(1.0, 0.06), (1.2, 0.02), (1.0, 0.5)])
def test_plan_follows_the_visit_rules(index, split, flt, ratio, coverage):
    req = query.make_request(index, split.queries[:40], K, flt)
    prm = SearchParams(ratio=ratio, coverage=coverage).resolved(K)
    qmask = query.quantized_mask(index, req.program)
    order, nvisit = query.plan(index, req, prm, qmask)
    ref = _plan_reference(index, req, prm, qmask)
    c = index.list_centroids.astype(np.float32)
    for qi, (o, nv) in enumerate(ref):
        assert nvisit[qi] == nv, (qi, nvisit[qi], nv)
        # the same lists (ties in distance may swap places)
        d = ((c[order[qi, :nv]] - req.queries[qi]) ** 2).sum(1)
        assert (np.diff(d) >= -1e-4).all()
        assert set(order[qi, :nv].tolist()) == set(o[:nv].tolist()) or np.isclose(
            d.max(), ((c[o[nv - 1]] - req.queries[qi]) ** 2).sum(), rtol=1e-4
        )


# --- RaBitQ codes (1 bit per rotated dimension, shared structured rotation) -------------------


@pytest.mark.parametrize("d", [50, 384, 768])
def test_shared_rotation_is_orthogonal(d):
    rot = rabitq.Rotation.random(d, seed=3)
    D = rabitq.padded_dims(d)
    assert D % 64 == 0 and D >= d
    p = rot.apply(np.eye(d, dtype=np.float32))  # rows: images of the unit vectors
    np.testing.assert_allclose(p @ p.T, np.eye(d), atol=2e-5)
    x = np.random.default_rng(0).normal(size=(20, d)).astype(np.float32)
    y = rot.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    # structured: O(D) numbers, not a d x d matrix
    assert rot.flip.size + rot.perm.size == 2 * rabitq.ROUNDS * D
    # the compiled transform (flip, permute, fast Walsh-Hadamard per block) is the matrix one
    np.testing.assert_allclose(y, rot.apply_numpy(x), atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rabitq_estimate_bounds_hold(split, metric):
    """Estimated distances from the 1-bit codes: the estimate is unbiased, and the lower bound
    (estimate - eps0 x the error bound) fails about as often as RaBitQ's analysis says: the
    error is close to Gaussian with the bound's unit as its spread, so a one-sided tail of
    ~2.9% at eps0 = 1.9 and ~0.13% at eps0 = 3 (checked with a 2x margin)."""
    base, qs = split.base[:3000], split.queries[:40]
    rot = rabitq.Rotation.random(base.shape[1], seed=0)
    centre = base[:200].mean(0)
    codes, fac = rabitq.encode(rot, base, np.broadcast_to(centre, base.shape))
    errs = []
    for eps0, most in ((1.9, 0.06), (3.0, 0.003)):
        viol = tot = 0
        for q in qs:
            est, lb = rabitq.estimate(codes, fac, rot.apply(q[None])[0], centre, q, metric, eps0)
            exact = ((base - q) ** 2).sum(1) if metric == "l2" else -(base @ q)
            viol += int((lb > exact + 1e-4).sum())
            tot += len(base)
            errs.append(est - exact)
            assert (lb <= est).all()
        assert viol / tot < most, (eps0, viol / tot)
    errs = np.concatenate(errs)
    spread = np.abs(errs).mean()
    assert abs(errs.mean()) < 0.1 * spread  # unbiased
    # a plain estimate (no bound) is wrong on either side about half the time
    assert (errs > 0).mean() > 0.3 and (errs < 0).mean() > 0.3


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rabitq_search_is_exact_when_every_list_is_visited(split, metric):
    base, qs = split.base[:5000], split.queries[:30]
    idx = build.build_index(base, n_partitions=2, metric=metric, quantizer="rabitq")
    assert idx.quantizer == "rabitq" and idx.rot.size == 0  # no per-partition d x d rotation
    truth, tdist = data.brute_force(base, qs, K, metric=metric)
    # an unbounded eps0 re-ranks every row: exactly brute force
    res = query.search(idx, qs, K, params=SearchParams(coverage=1.0, eps0=1e9))
    assert data.recall(res.ids, truth) == 1.0
    # the real bound re-ranks a small share of the rows and still finds (almost) every neighbour
    res = query.search(idx, qs, K, params=SearchParams(coverage=1.0))
    assert data.recall(res.ids, truth) >= 0.99
    assert res.stats["rows_reranked"] < 0.25 * len(base) * len(qs)
    # without the bound (the estimate alone decides what is re-ranked) recall drops: the bound
    # is what makes the pruning safe
    res0 = query.search(idx, qs, K, params=SearchParams(coverage=1.0, eps0=0.0))
    assert data.recall(res0.ids, truth) < data.recall(res.ids, truth)


def _reference_rq_search(idx, qs, k, coverage, eps0):
    """The RaBitQ search in plain Python, one row at a time in a single pass (a row is
    re-ranked when its lower bound beats the running k-th): what the compiled two-pass kernel
    must reproduce exactly. Returns (row positions per query, rows re-ranked)."""
    from hearth.functions.vecsearch import rq_kernels

    req = query.make_request(idx, qs, k)
    order, nvisit = query.plan(idx, req, SearchParams(coverage=coverage))
    rqs = idx.rotation().apply(req.queries)
    words = np.ascontiguousarray(idx.rq_codes).view(np.uint64).reshape(idx.n_rows, -1)
    D = rqs.shape[1]
    planes = np.zeros((rq_kernels.QBITS, D // 64), np.uint64)
    out, reranked = [], 0
    for qi, q in enumerate(req.queries):
        lo, delta, srq = rq_kernels.rq_planes(rqs[qi], planes)
        best: list[tuple[float, int]] = []
        eq = eps0 * 2.0 * delta * 2.0 * np.sqrt(D / 24.0)
        for li in order[qi, : nvisit[qi]]:
            c = idx.list_centroids[li].astype(np.float32)
            y2 = float(((q - c) ** 2).sum())
            for s, e in idx.ranges[idx.range_ptr[li] : idx.range_ptr[li + 1]]:
                for i in range(s, e):
                    acc = sum(
                        (1 << j) * sum(int(w).bit_count() for w in words[i] & planes[j])
                        for j in range(rq_kernels.QBITS)
                    )
                    pc = sum(int(w).bit_count() for w in words[i])
                    f = idx.rq_fac[i].astype(np.float64)
                    bpq = 2.0 * (delta * acc + lo * pc) - srq
                    est = y2 + f[0] - 2.0 * f[1] * (bpq - f[2])
                    lb = est - 2.0 * eps0 * np.sqrt(y2) * f[3] - eq * f[1]
                    if len(best) == k and lb >= best[-1][0]:
                        continue
                    reranked += 1
                    best = sorted([*best, (float(((idx.raw[i] - q) ** 2).sum()), i)])[:k]
        out.append([i for _, i in best])
    return out, reranked


def test_plan_walks_the_nearest_lists_in_order_until_covered(index, split):
    """The visit plan (a heap over the selected lists, not a full sort) is the nearest lists by
    centroid distance, in order, and stops at the first list that brings the covered rows to
    the coverage target."""
    qs = split.queries[:40]
    req = query.make_request(index, qs, K)
    for coverage in (0.01, 0.1, 0.5):
        prm = SearchParams(coverage=coverage).resolved(K, index)
        order, nvisit = query.plan(index, req, prm)
        sizes = np.diff(index.ranges, axis=1).ravel()  # one range per list after a build
        need = max(prm.min_candidates, int(coverage * sizes.sum()))
        c = index.list_centroids.astype(np.float32)
        for qi, q in enumerate(req.queries):
            nv = int(nvisit[qi])
            want = np.argsort(((c - q) ** 2).sum(1), kind="stable")[:nv]
            assert order[qi, :nv].tolist() == want.tolist()
            covered = np.cumsum(sizes[want])
            assert covered[-1] >= need and (nv == 1 or covered[-2] < need)


@pytest.mark.parametrize("D", [64, 384])
def test_fastscan_blocks_sum_the_quantized_query_over_each_code(D):
    """The blocked layout holds every list's rows in order (padded to 32 lanes), and both block
    sums (PSHUFB and the portable one) equal <code bits, u> computed from the unpacked bits."""
    from hearth.functions.vecsearch import fastscan, rq_kernels

    rng = np.random.default_rng(D)
    n = 300
    codes = rng.integers(0, 256, (n, D // 8), dtype=np.uint8)
    # 3 lists: one from two ranges (an insert batch appended), one empty, one of 1 row
    ranges = np.array([[0, 150], [290, 299], [150, 290], [299, 300]], dtype=np.int64)
    range_ptr = np.array([0, 2, 2, 3, 4], dtype=np.int64)  # list 1 empty
    fac = rng.normal(size=(n, 4)).astype(np.float32)
    blk = fastscan.pack_blocks(codes, fac, range_ptr, ranges)
    assert blk["blk_ptr"].tolist() == [0, 5, 5, 10, 11]
    want_rows = [*range(0, 150), *range(290, 299)]
    assert blk["blk_rows"][: len(want_rows)].tolist() == want_rows
    assert (blk["blk_rows"][len(want_rows) : 5 * 32] == -1).all()
    assert blk["blk_rows"][10 * 32] == 299
    bits = np.unpackbits(codes, axis=1, bitorder="little").astype(np.int64)
    u = np.empty(D, np.int64)
    rq_kernels.rq_levels(rng.normal(size=D).astype(np.float32), u)
    lut = np.empty((D // 4, 16), np.uint8)
    fastscan.query_lut(u, lut)
    a1, a2 = np.empty(32, np.int32), np.empty(32, np.int32)
    for b in range(int(blk["blk_ptr"][-1])):
        fastscan.block_sums_pshufb(blk["blk_codes"], b, lut, a1)
        fastscan.block_sums_scalar(blk["blk_codes"], b, lut, a2)
        rows = blk["blk_rows"][b * 32 : b * 32 + 32]
        live = rows >= 0
        want = np.zeros(32, np.int64)
        want[live] = bits[rows[live]] @ u
        assert (a1 == want).all() and (a2 == want).all(), b
        pc = blk["blk_pc"][b * 32 : b * 32 + 32]
        assert (pc[live] == bits[rows[live]].sum(1)).all() and (pc[~live] == 0).all()
        f = blk["blk_fac"][:, b * 32 : b * 32 + 32]
        assert (f[:, live] == fac[rows[live]].T).all() and (f[:, ~live] == 0).all()


def test_spill_picks_another_list_of_the_partition_with_an_unlike_residual():
    """SOAR's rule: the second list is never the first, stays in the row's partition, is the
    second-nearest centroid at lam = 0, and at lam > 0 leaves residuals less aligned."""
    from hearth.functions.vecsearch import spill

    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    lcent = rng.normal(size=(12, 16)).astype(np.float32)
    lpart = np.array([0] * 8 + [1] * 3 + [2], dtype=np.int32)
    d2 = ((x[:, None, :] - lcent[None]) ** 2).sum(2)
    part = rng.integers(0, 3, 600)
    mask = lpart[None, :] != part[:, None]
    near = np.argsort(np.where(mask, np.inf, d2), axis=1)
    lst = near[:, 0]
    second0 = spill.assign(x, lst, lcent, lpart, lam=0.0)
    single = part == 2
    assert (second0[single] == -1).all()
    assert (second0[~single] == near[~single, 1]).all()
    second = spill.assign(x, lst, lcent, lpart, lam=4.0)
    assert (spill.assign(x, lst, lcent, lpart, lam=4.0, chunk=64) == second).all()
    assert (second[single] == -1).all() and (second[~single] != lst[~single]).all()
    assert (lpart[second[~single]] == lpart[lst[~single]]).all()

    def align(s):
        r1, r2 = x[~single] - lcent[lst[~single]], x[~single] - lcent[s[~single]]
        cos = (r1 * r2).sum(1) / np.linalg.norm(r1, axis=1) / np.linalg.norm(r2, axis=1)
        return np.abs(cos).mean()

    assert align(second) < align(second0)


def test_spilled_rows_are_scanned_twice_and_returned_once(split):
    """Each row's copy sits in its second list (after the list's own rows, with a code taken
    around that list's centroid); a search returns every row at most once and finds at least
    what the unspilled index finds at the same coverage."""
    base, qs = split.base[:4000], split.queries[:200]
    idx = build.build_index(base, n_partitions=2, recall_target=None)
    plain = build.build_index(base, n_partitions=2, recall_target=None, spill_lambda=0)
    blk = idx.scan_blocks()
    sp = idx._spill()
    assert idx.spilled and not plain.spilled and len(sp["rows"]) == idx.n_rows
    lanes = blk["blk_rows"]
    for li in (0, 7):
        rows = lanes[blk["blk_ptr"][li] * 32 : blk["blk_ptr"][li + 1] * 32]
        rows = rows[rows >= 0]
        own = idx.partition_rows(int(idx.list_part[li]))
        n_own = sum(e - s for s, e in idx.ranges[idx.range_ptr[li] : idx.range_ptr[li + 1]])
        assert set(rows[n_own:].tolist()) == set(sp["rows"][sp["lists"] == li].tolist())
        assert set(rows.tolist()) <= set(own.tolist())
    for cov in (0.05, 0.2):
        prm = SearchParams(coverage=cov, threads=1)
        a = query.search(idx, qs, K, params=prm)
        b = query.search(plain, qs, K, params=prm)
        assert all(len(set(r.tolist())) == K for r in a.ids)
        truth = query.search(idx, qs, K, exact=True).ids
        rec = [
            np.mean([len(set(r) & set(t)) for r, t in zip(x.ids, truth, strict=True)])
            for x in (a, b)
        ]
        assert rec[0] >= rec[1]


def test_rabitq_kernel_matches_the_single_pass_reference(split):
    """The compiled kernel (two passes per range, prefetch, vectorized distances) re-ranks
    exactly the rows the plain single-pass rule does and returns the same neighbours."""
    base, qs = split.base[:3000], split.queries[:8]
    idx = build.build_index(
        base, n_partitions=1, quantizer="rabitq", recall_target=None, spill_lambda=0
    )
    for coverage, eps0 in ((0.2, 1.9), (0.5, 1.0)):
        want, n_rr = _reference_rq_search(idx, qs, K, coverage, eps0)
        prm = SearchParams(coverage=coverage, eps0=eps0, threads=1)
        res = query.search(idx, qs, K, params=prm)
        got = [[idx.position_of()[int(i)] for i in row] for row in res.ids]
        assert got == want
        assert res.stats["rows_reranked"] == n_rr


def test_rabitq_filters_keep_their_guarantees(index, split):
    for name in ("uniform_8pct", "correlated_rank", "and", "tiny", "none_match"):
        flt = FILTERS[name]
        mask = exact_np(split, flt)
        res = query.search(index, split.queries, K, flt=flt)
        ok = set(split.base_ids[mask].tolist())
        assert set(res.ids[res.ids >= 0].tolist()) <= ok, name
        assert (res.counts == min(K, int(mask.sum()))).all(), name
        if mask.sum() >= 200:
            truth, _ = data.brute_force(split.base, split.queries, K, mask=mask)
            assert data.recall(res.ids, ids_of(split, truth)) >= 0.9, name


def test_rabitq_roundtrip_inserts_deletes(index, split, tmp_path):
    storage.save(index, tmp_path / "rq.hvx")
    idx = storage.load(tmp_path / "rq.hvx")
    assert idx.quantizer == "rabitq"
    qs = split.queries[:20]
    a = query.search(index, qs, K)
    b = query.search(idx, qs, K)
    assert (a.ids == b.ids).all()
    assert idx.build_info["calibration"] == index.build_info["calibration"]
    gone = np.unique(b.ids[:3])
    idx.delete(gone)
    new_ids = np.arange(20_000_000, 20_000_000 + len(qs))
    attrs = {"rank": np.full(len(qs), 5), "len": np.full(len(qs), 99), "u": np.full(len(qs), 7)}
    idx.insert(qs, attrs, ids=new_ids)
    res = query.search(idx, qs, K)
    assert (res.ids[:, 0] == new_ids).all()
    assert not set(res.ids.ravel().tolist()) & set(gone.tolist())
    storage.save(idx, tmp_path / "rq2.hvx")
    assert (query.search(storage.load(tmp_path / "rq2.hvx"), qs, K).ids == res.ids).all()


def test_rabitq_memory_scales_with_dimension(index):
    # 50-d pads to 64 bits = 8 code bytes + 16 factor bytes; no d x d rotation anywhere
    mem = index.memory_bytes()
    assert mem["codes"] == 8 * index.n_rows
    assert mem["code_factors"] == 16 * index.n_rows
    # the scan's blocked copy: the same 8 + 16 bytes + a lane's row (4) and popcount (2),
    # lists padded to blocks of 32 rows; every row twice (spill.py: its second list's copy)
    lanes = len(index.scan_blocks()["blk_rows"])
    assert 2 * index.n_rows <= lanes < 2 * index.n_rows + 32 * index.n_lists
    assert mem["scan_blocks"] == 30 * lanes + 8 * (index.n_lists + 1)
    # the spilled copies' second list (4 B), kept for inserts
    assert mem["spill_copies"] == 4 * index.n_rows
    assert index.bytes_per_vector() <= 100


# --- calibration: a recall target instead of knobs --------------------------------------------


def test_effort_for_reads_the_curve():
    curve = [[0.01, 0.7], [0.02, 0.9], [0.04, 0.955], [0.08, 0.97]]
    assert calibrate.effort_for(curve, 0.9, margin=0.0) == 0.02
    assert calibrate.effort_for(curve, 0.95, margin=0.01) == 0.08
    assert calibrate.effort_for(curve, 0.94, margin=0.01) == 0.04
    assert calibrate.effort_for(curve, 0.99) == 1.0  # beyond what was measured: everything
    assert calibrate.effort_for(curve, 0.5) == 0.01


@pytest.mark.parametrize("quantizer", ["osq", "rabitq"])
def test_calibration_reaches_the_target_on_held_out_queries(split, quantizer):
    """Calibrated on samples of the base rows only; checked on the held-out queries."""
    idx = build.build_index(
        split.base, ids=split.base_ids, n_partitions=4, quantizer=quantizer, recall_target=0.9
    )
    cal = idx.build_info["calibration"]
    assert cal["target"] == 0.9 and 0 < cal["coverage"] < 1.0
    truth, _ = data.brute_force(split.base, split.queries, K)
    gt = ids_of(split, truth)
    r90 = data.recall(query.search(idx, split.queries, K).ids, gt)
    assert r90 >= 0.9 - 0.015, r90
    # a query-time override asks for more: more coverage, higher recall
    hi = SearchParams(recall_target=0.97)
    assert hi.resolved(K, idx).coverage > cal["coverage"]
    r97 = data.recall(query.search(idx, split.queries, K, params=hi).ids, gt)
    assert r97 >= 0.97 - 0.015 and r97 > r90, (r90, r97)
    # and an explicit coverage still wins over the calibration
    assert SearchParams(coverage=0.5).resolved(K, idx).coverage == 0.5


def test_numba_cache_is_dropped_when_an_inlined_helper_changes(tmp_path):
    """numba checks only a kernel's own file; the package drops the compiled cache of every
    kernel file when any of them changes (the scan kernels inline fastscan and row_kernels)."""
    from hearth.functions import vecsearch

    for name in vecsearch._KERNEL_FILES:
        (tmp_path / name).write_text(f"# {name}\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    compiled = cache / "rq_kernels.search_batch_rq-134.py311.nbi"
    other = cache / "query.cpython-311.pyc"
    compiled.write_text("old")
    other.write_text("pyc")
    vecsearch._drop_stale_numba_cache(tmp_path)
    assert not compiled.exists() and other.exists()
    compiled.write_text("new")
    vecsearch._drop_stale_numba_cache(tmp_path)  # same sources: the cache stays
    assert compiled.exists()
    (tmp_path / "fastscan.py").write_text("# edited\n")
    vecsearch._drop_stale_numba_cache(tmp_path)
    assert not compiled.exists() and other.exists()


def test_every_compiled_module_is_in_the_numba_cache_check():
    """A module with numba functions left out of _KERNEL_FILES would keep stale inlined code."""
    from pathlib import Path

    from hearth.functions import vecsearch

    here = Path(vecsearch.__file__).parent
    compiled = {p.name for p in here.glob("*.py") if "from numba" in p.read_text()}
    assert compiled == set(vecsearch._KERNEL_FILES)


def test_threaded_search_works_in_a_forked_child(index, split):
    """The batch's thread pool lives across searches; a child forked after the parent used it
    must get a pool of its own (the parent's threads do not exist there: it would wait forever)."""
    import multiprocessing as mp

    prm = SearchParams(threads=2)
    want = query.search(index, split.queries[:32], K, params=prm).ids  # the pool now exists

    def child(conn):
        conn.send(query.search(index, split.queries[:32], K, params=prm).ids)

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child, args=(send,))
    p.start()
    got = recv.recv() if recv.poll(60) else None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    assert got is not None, "the forked child's threaded search never finished"
    assert np.array_equal(got, want)


def test_first_searches_in_several_threads_derive_the_blocks_once(split):
    """Holders serving concurrent queries start searching one index at once: the blocked layout
    and its spilled copies are derived once (two derivations at once appended the copies twice,
    and the next search indexed rows past the end)."""
    import threading

    base = split.base[:4000]
    built = build.build_index(base, n_partitions=2, recall_target=None)
    for _ in range(5):
        idx = copy.copy(built)
        idx._blocks = idx._spilled = None
        go = threading.Barrier(4)
        out: list = []

        def first(idx: object, go: threading.Barrier, out: list) -> None:
            go.wait()
            out.append(idx.scan_blocks())

        threads = [threading.Thread(target=first, args=(idx, go, out)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(idx._spilled["second"]) == idx.n_rows
        assert all(b is out[0] for b in out)
