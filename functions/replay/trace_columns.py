"""A cold-start table as numpy columns and dense integer group codes.

Each key column (region, cluster, pool, function, runtime, trigger) is hashed once into
integer codes (:class:`Columns`); counts and means per group, per function, per hour and per
time bucket are ``np.bincount`` over those codes."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl

from . import schemas as S

MISSING = "(missing)"  # name of the group of rows whose key is empty
T = S.TOTAL
COMP = list(S.COMPONENTS)


@dataclass
class Groups:
    """Dense integer codes (0..k-1) of a key column; names sorted, empty keys as MISSING."""

    names: list[str]
    codes: np.ndarray  # compact (uint8/uint16): cheap to gather and to radix-sort

    @property
    def k(self) -> int:
        return len(self.names)

    @cached_property
    def index(self) -> np.ndarray:
        """The codes as ``np.intp``, cast once: ``np.bincount`` copies any other dtype to intp
        on every call (16 MB and its page faults per call at 2 M rows)."""
        return self.codes.astype(np.intp)


def _categorical() -> pl.DataType:
    """A Categorical with its own category mapping (compact codes, freed with the column),
    not the process-wide one, which keeps every string it has ever seen."""
    cats = getattr(pl, "Categories", None)
    return pl.Categorical(cats.random()) if cats is not None else pl.Categorical()


def group_codes_many(df: pl.DataFrame, cols: list[str]) -> dict[str, Groups]:
    """``group_codes`` of several columns; the strings of all of them are hashed in one polars
    pass (one column per thread)."""
    cat = df.select([pl.col(c).cast(pl.String).cast(_categorical()) for c in dict.fromkeys(cols)])
    return {c: _codes_of(cat[c]) for c in cols}


def group_codes(s: pl.Series) -> Groups:
    return _codes_of(s.cast(pl.String).cast(_categorical()))


def _codes_of(c: pl.Series) -> Groups:
    cats = getattr(c.dtype, "categories", None)
    if cats is not None and hasattr(cats, "to_series") and not cats.is_global():
        # the column's own mapping (see _categorical): its ids are 0..k-1, its categories
        # exactly the column's values, so no pass over the rows is needed to find them
        names = cats.to_series().to_list()
        phys = c.to_physical()
        if phys.null_count():
            phys = phys.fill_null(len(names))
            names.append(MISSING)
        return _in_name_order(names, phys.to_numpy())
    u = c.unique()
    names = u.cast(pl.String).fill_null(MISSING).to_list()
    up = u.to_physical()
    sentinel = int(up.max()) + 1 if up.null_count() < up.len() else 0
    up_np = up.fill_null(sentinel).to_numpy().astype(np.int64)
    ids = np.zeros(int(up_np.max()) + 1 if up_np.size else 1, dtype=np.int64)
    ids[up_np] = np.arange(len(names))  # physical id -> position in names
    return _in_name_order(names, ids[c.to_physical().fill_null(sentinel).to_numpy()])


def _in_name_order(names: list[str], idx: np.ndarray) -> Groups:
    """Groups from each row's index into ``names``, renumbered in name order (compact)."""
    rank = np.argsort(np.array(names, dtype=object), kind="stable")
    small = np.uint8 if len(names) <= 256 else np.uint16 if len(names) <= 65536 else np.int64
    lut = np.empty(max(len(names), 1), dtype=small)
    lut[rank] = np.arange(len(names))
    return Groups([names[i] for i in rank], lut[idx])


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense codes of the pairs (a, b) (a: codes >= 0, b: any int64), numbered in (a, b)
    order; and the a and b of each code."""
    if a.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    a = a.astype(np.int64, copy=False)
    bmin = int(b.min())
    span = int(b.max()) - bmin + 1
    amax = int(a.max())
    key = b - bmin  # + a * span, without n-sized temporaries when a is all 0 (one region)
    if amax > 0:
        key += a * span
    if span * (amax + 1) <= 8 * a.size + 4096:  # small key space: counting
        cnt = np.bincount(key)
        present = np.flatnonzero(cnt)
        lut = np.zeros(cnt.size, dtype=np.int64)
        lut[present] = np.arange(present.size)
        inv = lut[key]
    else:  # sparse (e.g. epoch-second hours over years): sort
        present, inv = np.unique(key, return_inverse=True)
    return inv, present // span, present % span + bmin


class Columns:
    """The numeric columns of a cold-start table as numpy arrays and its key columns as
    integer codes. Group aggregations are bincounts over the codes, so each key's strings are
    hashed once, not once per aggregation."""

    def __init__(self, df: pl.DataFrame, keys: dict[str, str], x: np.ndarray | None = None):
        """``x``: the total column as numpy, if the caller has it already (each conversion of
        a column read from many files is a copy)."""
        self.n = df.height
        self.x = df[T].cast(pl.Float64).to_numpy() if x is None else x
        self.comp = {c: df[c].cast(pl.Float64).to_numpy() for c in COMP}
        self.time = df["time"].cast(pl.Float64).to_numpy()
        self.keys = dict(keys) | {"function": "funcID"}
        codes = group_codes_many(df, list(self.keys.values()))
        self.groups = {name: codes[col] for name, col in self.keys.items()}

    def sums(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows and sums of the total and of each component per code."""
        cols = {T: self.x, **self.comp}
        if k == 1:  # e.g. one region: plain sums, no pass over the codes
            return np.array([codes.size]), {c: np.array([v.sum()]) for c, v in cols.items()}
        count = np.bincount(codes, minlength=k)
        return count, {c: np.bincount(codes, weights=v, minlength=k) for c, v in cols.items()}

    def means(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        count, sums = self.sums(codes, k)
        return count, _means(count, sums)

    def per_time(self, width: float, by_region: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
        """Per (region and) time bucket of ``width`` seconds, in (region, bucket) order: the
        region code and bucket of each group, its rows and means. Rows whose time is not
        finite are left out."""
        ok = np.isfinite(self.time)
        every = bool(ok.all())
        t = np.floor_divide(self.time if every else self.time[ok], width).astype(np.int64)
        one = not by_region or self.groups["region"].k == 1
        reg = np.broadcast_to(np.intp(0), (self.n,)) if one else self.groups["region"].index
        inv, r, b = _pairs(reg if every else reg[ok], t)
        cols = {T: self.x, **self.comp}
        if not every:
            cols = {c: v[ok] for c, v in cols.items()}
        count = np.bincount(inv, minlength=r.size)
        sums = {c: np.bincount(inv, weights=v, minlength=r.size) for c, v in cols.items()}
        return r, b, {"count": count, **_means(count, sums), "sums": sums}


def _means(count: np.ndarray, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return {c: v / count for c, v in sums.items()}


def coarser(b: np.ndarray, m: dict, factor: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Buckets ``factor`` times wider from finer per-bucket counts and sums (e.g. days from
    (region, hour) groups): (bucket, {count, means})."""
    inv, _, wide = _pairs(np.zeros(b.size, dtype=np.int64), np.floor_divide(b, factor))
    k = wide.size
    count = np.bincount(inv, weights=m["count"], minlength=k)
    sums = {c: np.bincount(inv, weights=v, minlength=k) for c, v in m["sums"].items()}
    return wide, {"count": count, **_means(count, sums)}


def per_function_frame(cols: Columns) -> pl.DataFrame:
    g = cols.groups["function"]
    count, means = cols.means(g.index, g.k)
    keep = count > 0
    return pl.DataFrame(
        {"coldstarts": count[keep], T: means[T][keep], **{c: means[c][keep] for c in COMP}}
    )


def per_hour_frames(cols: Columns, raw: tuple | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cold starts and mean components per (region, hour); and (region, h, len) sorted."""
    r, h, m = raw if raw is not None else cols.per_time(3600.0)
    names = cols.groups["region"].names
    per_hour = pl.DataFrame({"coldstarts": m["count"], T: m[T], **{c: m[c] for c in COMP}})
    hourly = pl.DataFrame({"region": [names[i] for i in r], "h": h, "len": m["count"]})
    return per_hour, hourly
