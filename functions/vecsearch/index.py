"""The in-memory index: flat arrays shared by the kernels, plus inserts and deletes.

Each partition (one PCA rotation + OSQ quantizer, the unit a holder serves) is split into k-means
lists (the unit the visit rule prunes). List l owns the row ranges ranges[range_ptr[l]:range_ptr[l+1]].
A build gives one range per list; each insert batch appends rows at the end and adds a range to
every list it touched (no rebuild: the partition's existing quantizer encodes them).
Deletes clear a bit in the `alive` bitmap (tombstones) that every kernel checks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import fastscan, quantize, rabitq, spill
from .attributes import NCELLS, AttributeSpec

# Deriving the blocked layout (and the spilled copies) happens once per index, on first search;
# searches of one index can start at once in several threads (a holder serving concurrent
# queries), and two derivations at once would append the spilled rows twice.
_DERIVE = threading.Lock()

METRICS = ("l2", "cosine", "ip")


@dataclass
class VecIndex:
    dims: int
    metric: str
    bits_per_dim: float
    nseg: int
    sign_dims: int
    attributes: list[AttributeSpec]
    centroids: np.ndarray  # f32[P, d] partition centroids
    list_centroids: np.ndarray  # f16[L, d] k-means lists inside the partitions (visit units)
    list_part: np.ndarray  # i32[L] partition of each list
    list_rc: np.ndarray  # f16[L, d] list centre in its partition's rotated frame (sign-bit origin)
    rot: np.ndarray  # f32[P, d, d]
    means: np.ndarray  # f32[P, d]
    bits: np.ndarray  # u8[P, d]
    bitoff: np.ndarray  # i32[P, d]
    bnd_off: np.ndarray  # i64[P, d]
    bnd: np.ndarray  # f32[*]
    range_ptr: np.ndarray  # i64[L + 1] list -> its row ranges
    ranges: np.ndarray  # i64[R, 2]
    codes: np.ndarray  # u8[nseg + 1, N]
    signs: np.ndarray  # u32[N] sign bits of the first sign_dims rotated dims (list residual)
    acodes: np.ndarray  # u8[A, N]
    alive: np.ndarray  # u64[ceil(N / 64)]
    hist: np.ndarray  # i64[P, A, 256] attribute-cell counts of live rows
    raw: np.ndarray  # f32[N, d] (memory-mapped when loaded from disk)
    attrs: np.ndarray  # f64[A, N] (memory-mapped when loaded from disk)
    ids: np.ndarray  # i64[N] external ids (memory-mapped when loaded from disk)
    labels: list[str] | None = None
    build_info: dict[str, Any] = field(default_factory=dict)
    # "osq" (the per-partition arrays above) or "rabitq" (those empty; the four below instead)
    quantizer: str = "osq"
    rq_flip: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    rq_perm: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    rq_codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))  # u8[N, D/8]
    rq_fac: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # f32[N, 4]
    _id_pos: dict[int, int] | None = field(default=None, repr=False)
    _blocks: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _spilled: dict[str, np.ndarray] | None = field(default=None, repr=False)

    # --- sizes --------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_partitions(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_live(self) -> int:
        return int(np.unpackbits(self.alive.view(np.uint8)).sum())

    @property
    def n_lists(self) -> int:
        return int(self.list_centroids.shape[0])

    def partition_rows(self, p: int) -> np.ndarray:
        out = [np.zeros(0, np.int64)]
        for li in np.nonzero(self.list_part == p)[0]:
            out += [
                np.arange(s, e) for s, e in self.ranges[self.range_ptr[li] : self.range_ptr[li + 1]]
            ]
        return np.concatenate(out)

    def partition_sizes(self) -> np.ndarray:
        """Live rows per partition."""
        return self.hist[:, 0, :].sum(axis=1)

    def scan_blocks(self) -> dict[str, np.ndarray]:
        """RaBitQ: the codes in the search kernel's blocked layout (fastscan.pack_blocks),
        derived from the row-major codes on first use and again after an insert."""
        blocks = self._blocks
        if blocks is None:
            with _DERIVE:
                if self._blocks is None:
                    self._blocks = fastscan.pack_blocks(
                        self.rq_codes, self.rq_fac, self.range_ptr, self.ranges, self._spill()
                    )
                blocks = self._blocks
        return blocks

    @property
    def spilled(self) -> bool:
        """Whether some rows are scanned in two lists (the kernel then re-ranks each once)."""
        self.scan_blocks()
        return bool(self._spilled is not None and (self._spilled["second"] >= 0).any())

    def _spill(self) -> dict | None:
        """The second copies of the rows (spill.py) when the index was built with spill. The
        second list of rows seen before is kept (4 B/row), so an insert assigns only its own;
        the copies' codes live only in the blocked layout and are encoded again when it is."""
        lam = float(self.build_info.get("spill_lambda", 0.0))
        if lam <= 0 or self.quantizer != "rabitq":
            return None
        lcent = self.list_centroids.astype(np.float32)
        done = len(self._spilled["second"]) if self._spilled else 0
        if done < self.n_rows:
            lst = np.zeros(self.n_rows, dtype=np.int64)
            for li in range(self.n_lists):
                for s, e in self.ranges[self.range_ptr[li] : self.range_ptr[li + 1]]:
                    lst[s:e] = li
            x = np.asarray(self.raw[done:], dtype=np.float32)
            second = spill.assign(x, lst[done:], lcent, self.list_part, lam).astype(np.int32)
            if self._spilled:
                second = np.concatenate([self._spilled["second"], second])
            self._spilled = dict(second=second)
        second = self._spilled["second"]
        rows = np.nonzero(second >= 0)[0]
        codes = np.zeros((len(rows), self.rq_codes.shape[1]), np.uint8)
        fac = np.zeros((len(rows), 4), np.float32)
        rot = self.rotation()
        for s in range(0, len(rows), 32768):
            r = rows[s : s + 32768]
            x = np.asarray(self.raw[r], dtype=np.float32)
            codes[s : s + len(r)], fac[s : s + len(r)] = rabitq.encode(rot, x, lcent[second[r]])
        return dict(rows=rows, lists=second[rows], codes=codes, fac=fac)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the in-memory quantized index (raw vectors/attributes/ids stay on disk)."""
        blocks = self.scan_blocks() if self.quantizer == "rabitq" else {}
        parts = {
            "scan_blocks": sum(a.nbytes for a in blocks.values()),
            "spill_copies": sum(a.nbytes for a in (self._spilled or {}).values()),
            "codes": self.codes[: self.nseg].nbytes + self.rq_codes.nbytes,
            "signs": self.signs.nbytes,
            "code_factors": self.rq_fac.nbytes,
            "attr_codes": self.acodes.nbytes,
            "tombstones": self.alive.nbytes,
            "quantizers": self.rot.nbytes
            + self.means.nbytes
            + self.bits.nbytes
            + self.bitoff.nbytes
            + self.bnd_off.nbytes
            + self.bnd.nbytes
            + self.centroids.nbytes
            + self.rq_flip.nbytes
            + self.rq_perm.nbytes,
            "lists": self.list_centroids.nbytes + self.list_part.nbytes + self.list_rc.nbytes,
            "partition_meta": self.range_ptr.nbytes + self.ranges.nbytes + self.hist.nbytes,
        }
        parts["total"] = sum(parts.values())
        return parts

    def bytes_per_vector(self) -> float:
        return self.memory_bytes()["total"] / max(1, self.n_live)

    # --- metric helpers -------------------------------------------------------------------------
    def to_metric_space(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.metric == "cosine":
            nrm = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(nrm == 0, 1, nrm)
        return x

    def rotation(self) -> rabitq.Rotation:
        return rabitq.Rotation(self.rq_flip, self.rq_perm)

    def partition_quantizer(self, p: int) -> quantize.PartitionQuantizer:
        bounds = []
        for a in range(self.dims):
            o = int(self.bnd_off[p, a])
            bounds.append(self.bnd[o : o + (1 << int(self.bits[p, a])) + 1])
        return quantize.PartitionQuantizer(
            self.means[p], self.rot[p], self.bits[p], self.bitoff[p], bounds
        )

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Nearest list of each row (in metric space)."""
        c = self.list_centroids.astype(np.float32)
        d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
        return np.argmin(d2, axis=1)

    # --- updates --------------------------------------------------------------------------------
    def position_of(self) -> dict[int, int]:
        if self._id_pos is None:
            self._id_pos = {int(i): p for p, i in enumerate(np.asarray(self.ids))}
        return self._id_pos

    def insert(
        self, vectors: np.ndarray, attrs: dict[str, Any] | None = None, ids: Any = None
    ) -> np.ndarray:
        """Append rows to their nearest partitions using the partitions' existing quantizers."""
        x, ids, raw_attr = self._insert_inputs(vectors, attrs or {}, ids)
        n = len(x)
        xm = self.to_metric_space(x)
        lst = self.assign(xm)
        order = np.argsort(lst, kind="stable")
        xm, x, lst, ids, raw_attr = xm[order], x[order], lst[order], ids[order], raw_attr[:, order]
        part = self.list_part[lst].astype(np.int64)
        base = self.n_rows
        codes, signs = self._encode_rows(xm, lst, part)
        new_ranges: dict[int, tuple[int, int]] = {}
        for li in np.unique(lst):
            sel = np.nonzero(lst == li)[0]  # contiguous: rows are sorted by list
            new_ranges[int(li)] = (base + int(sel[0]), base + int(sel[-1]) + 1)
        acodes = (
            np.stack([spec.codes(raw_attr[a]) for a, spec in enumerate(self.attributes)])
            if self.attributes
            else np.zeros((0, n), np.uint8)
        )
        self.codes = np.concatenate([self.codes, codes], axis=1)
        self.signs = np.concatenate([self.signs, signs])
        self.acodes = np.concatenate([self.acodes, acodes], axis=1)
        self.raw = np.concatenate([np.asarray(self.raw), xm if self.metric == "cosine" else x])
        self.attrs = np.concatenate([np.asarray(self.attrs), raw_attr], axis=1)
        self.ids = np.concatenate([np.asarray(self.ids), ids])
        if self.labels is not None:
            self.labels = self.labels + [str(i) for i in ids]
        need = (self.n_rows + 63) // 64
        alive = np.zeros(need, dtype=np.uint64)
        alive[: len(self.alive)] = self.alive
        self.alive = alive
        for j in range(n):
            self._set_alive(base + j, True)
        self._blocks = None  # the blocked codes are derived again on the next search
        self._append_ranges(new_ranges)
        for a in range(len(self.attributes)):
            np.add.at(self.hist, (part, a, acodes[a]), 1)
        if not self.attributes:
            np.add.at(self.hist, (part, 0, 0), 1)
        pos_of = self.position_of()
        for j, i in enumerate(ids):
            pos_of[int(i)] = base + j
        return ids

    def _insert_inputs(
        self, vectors: np.ndarray, attrs: dict[str, Any], ids: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An insert's inputs checked (ValueError names the bad one): the vectors as float32,
        the ids (default: after the largest), the raw attribute values f64[A, n]."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dims:
            raise ValueError(f"insert: vectors must have shape (n, {self.dims}), got {x.shape}")
        n = len(x)
        names = [a.name for a in self.attributes]
        unknown = sorted(set(attrs) - set(names))
        if unknown:
            raise ValueError(f"insert: unknown attribute(s) {unknown} (known: {names})")
        missing = [a for a in names if a not in attrs]
        if missing:
            raise ValueError(f"insert: missing attribute(s) {missing}")
        pos_of = self.position_of()
        if ids is None:
            start = int(np.max(self.ids)) + 1 if self.n_rows else 0
            ids = np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != n:
            raise ValueError(f"insert: {len(ids)} ids for {n} vectors")
        dup = [int(i) for i in ids if int(i) in pos_of and self.is_alive(pos_of[int(i)])]
        if dup or len(set(ids.tolist())) != n:
            raise ValueError(f"insert: ids already present: {dup[:5] or 'duplicates in batch'}")
        raw_attr = np.zeros((len(names), n), dtype=np.float64)
        for a, spec in enumerate(self.attributes):
            col = attrs[spec.name]
            if len(col) != n:
                raise ValueError(
                    f"insert: attribute '{spec.name}' has {len(col)} values for {n} vectors"
                )
            raw_attr[a] = spec.raw_values(list(col) if spec.kind == "categorical" else col)
        return x, ids, raw_attr

    def _encode_rows(
        self, xm: np.ndarray, lst: np.ndarray, part: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode new rows (metric space, sorted by list) with the existing quantizers: RaBitQ
        codes are appended here; OSQ codes and signs are returned (empty for RaBitQ)."""
        n = len(xm)
        codes = np.zeros((self.nseg + 1, n), dtype=np.uint8)
        signs = np.zeros(n, dtype=np.uint32)
        if self.quantizer == "rabitq":
            rc, rf = rabitq.encode(self.rotation(), xm, self.list_centroids[lst].astype(np.float32))
            self.rq_codes = np.concatenate([self.rq_codes, rc])
            self.rq_fac = np.concatenate([self.rq_fac, rf])
            return codes[:, :0], signs[:0]
        for p in np.unique(part):
            sel = np.nonzero(part == p)[0]
            q = self.partition_quantizer(int(p))
            q.widen(q.rotate(xm[sel]))  # bounds are views into self.bnd: widened in place
            c, s = quantize.encode(
                q, xm[sel], self.nseg, self.sign_dims, self.list_rc[lst[sel]].astype(np.float32)
            )
            codes[:, sel] = c
            signs[sel] = s
        return codes, signs

    def _append_ranges(self, new_ranges: dict[int, tuple[int, int]]) -> None:
        """Rebuild the range table with one new range appended to each list that got rows."""
        rng = [
            list(map(tuple, self.ranges[self.range_ptr[li] : self.range_ptr[li + 1]]))
            for li in range(self.n_lists)
        ]
        for p, r in new_ranges.items():
            rng[p].append(r)
        self.range_ptr = np.cumsum([0] + [len(r) for r in rng]).astype(np.int64)
        self.ranges = np.asarray([r for rs in rng for r in rs], dtype=np.int64).reshape(-1, 2)

    def delete(self, ids: Any) -> int:
        """Tombstone rows by external id; returns how many live rows were removed."""
        pos_of = self.position_of()
        removed = 0
        rows = []
        for i in np.asarray(ids, dtype=np.int64).ravel():
            pos = pos_of.get(int(i))
            if pos is not None and self.is_alive(pos):
                self._set_alive(pos, False)
                rows.append(pos)
                removed += 1
        if rows:
            rows_a = np.asarray(rows)
            part = self.partition_of_rows(rows_a)
            for a in range(len(self.attributes)):
                np.add.at(self.hist, (part, a, self.acodes[a, rows_a]), -1)
            if not self.attributes:
                np.add.at(self.hist, (part, 0, 0), -1)
        return removed

    def partition_of_rows(self, rows: np.ndarray) -> np.ndarray:
        owner = np.repeat(self.list_part.astype(np.int64), np.diff(self.range_ptr))
        idx = np.argsort(self.ranges[:, 0], kind="stable")
        r = np.searchsorted(self.ranges[idx, 0], rows, side="right") - 1
        return owner[idx[r]]

    def is_alive(self, pos: int) -> bool:
        return bool((int(self.alive[pos >> 6]) >> (pos & 63)) & 1)

    def _set_alive(self, pos: int, on: bool) -> None:
        w = int(self.alive[pos >> 6])
        w = w | (1 << (pos & 63)) if on else w & ~(1 << (pos & 63))
        self.alive[pos >> 6] = np.uint64(w)


def alive_all(n: int) -> np.ndarray:
    alive = np.zeros((n + 63) // 64, dtype=np.uint64)
    full, rest = divmod(n, 64)
    alive[:full] = np.uint64(0xFFFFFFFFFFFFFFFF)
    if rest:
        alive[full] = np.uint64((1 << rest) - 1)
    return alive


def attr_hist(part: np.ndarray, acodes: np.ndarray, n_parts: int) -> np.ndarray:
    hist = np.zeros((n_parts, max(1, acodes.shape[0]), NCELLS), dtype=np.int64)
    if acodes.shape[0] == 0:
        hist[:, 0, 0] = np.bincount(part, minlength=n_parts)
        return hist
    for a in range(acodes.shape[0]):
        np.add.at(hist, (part, a, acodes[a]), 1)
    return hist
