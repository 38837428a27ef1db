"""OSQ-style per-partition quantizer (SQUASH): PCA rotation, greedy bit allocation by variance,
non-uniform cells (equal-population quantiles refined by 1-D Lloyd-Max), column-wise packing and
sign bits. Pure numpy/numba, no I/O."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from . import build_kernels

MAX_BITS = 8
MAX_SIGN_DIMS = 32  # sign bits per vector: one u32 (4 bytes)


@dataclass
class PartitionQuantizer:
    mean: np.ndarray  # f32[d]
    rot: np.ndarray  # f32[d, d]; rows are principal axes, by decreasing variance
    bits: np.ndarray  # u8[d]
    bitoff: np.ndarray  # i32[d]
    bounds: list[np.ndarray]  # per dim: f32[2**bits + 1], outer bounds = data min/max

    def rotate(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) @ self.rot.T

    def cells(self, xr: np.ndarray) -> np.ndarray:
        """Cell id per (row, dim) of rotated rows."""
        out = np.zeros(xr.shape, dtype=np.uint16)
        for a, b in enumerate(self.bounds):
            if len(b) > 2:
                out[:, a] = np.clip(np.searchsorted(b[1:-1], xr[:, a], side="right"), 0, len(b) - 2)
        return out

    def widen(self, xr: np.ndarray) -> None:
        """Stretch outer cell bounds to cover new rows so lower bounds stay valid after inserts."""
        for a, b in enumerate(self.bounds):
            b[0] = min(b[0], float(xr[:, a].min()))
            b[-1] = max(b[-1], float(xr[:, a].max()))


def allocate_bits(variances: np.ndarray, budget: int, cap: int = MAX_BITS) -> np.ndarray:
    """Hand out `budget` bits one at a time to the dimension with the largest remaining variance;
    each bit divides that dimension's remaining variance by 4 (6 dB); at most `cap` bits/dim."""
    d = len(variances)
    bits = np.zeros(d, dtype=np.uint8)
    heap = [(-float(v), a) for a, v in enumerate(variances)]
    heapq.heapify(heap)
    budget = min(budget, cap * d)
    while budget > 0 and heap:
        negv, a = heapq.heappop(heap)
        bits[a] += 1
        budget -= 1
        if bits[a] < cap:
            heapq.heappush(heap, (negv / 4.0, a))
    return bits


def pack_bytes(bits: np.ndarray, nseg: int) -> tuple[np.ndarray, np.ndarray]:
    """Place each dimension's code inside one 8-bit segment (no code straddles a byte), so a
    query can fold the per-dimension lower bounds of a segment into one 256-entry table and
    bound a row with one lookup per *byte* instead of one bit-extraction per *dimension*.

    Best-fit decreasing into `nseg` bytes, dimensions in variance order among equal widths; a
    dimension that fits nowhere loses a bit until it does (with the default budget of
    3.5 bits x 50 dims = 175 bits in 22 bytes nothing is lost). Segment 0 then holds the
    highest-variance dimensions, which early abandoning relies on. Returns (bits, bitoff)."""
    bits = np.asarray(bits, dtype=np.uint8).copy()
    bitoff = np.zeros(len(bits), dtype=np.int32)
    free = [8] * nseg
    for a in sorted(range(len(bits)), key=lambda a: (-int(bits[a]), a)):
        w = int(bits[a])
        while w > 0:
            fits = [s for s in range(nseg) if free[s] >= w]
            if fits:
                s = min(fits, key=lambda s: (free[s], s))
                bitoff[a] = 8 * s + (8 - free[s])
                free[s] -= w
                break
            w -= 1
        bits[a] = w
        if w == 0:
            bitoff[a] = 0
    return bits, bitoff


def check_byte_packing(bits: np.ndarray, bitoff: np.ndarray, nseg: int) -> str | None:
    """None if the codes are laid out as pack_bytes does (each inside one segment, packed from
    bit 0 of its segment without gaps: what the kernel's table folding assumes), else why."""
    nxt = [0] * nseg
    for a in sorted(range(len(bits)), key=lambda a: int(bitoff[a])):
        w, o = int(bits[a]), int(bitoff[a])
        if w == 0:
            continue
        if (o & 7) + w > 8 or (o >> 3) >= nseg:
            return f"dimension {a} ({w} bits at bit {o}) straddles a byte or lies past segment {nseg - 1}"
        if (o & 7) != nxt[o >> 3]:
            return f"dimension {a} ({w} bits at bit {o}) leaves a gap or overlaps in its segment"
        nxt[o >> 3] += w
    return None


def lloyd_max_bounds(x: np.ndarray, nbits: int, iters: int = 8) -> np.ndarray:
    """Cell boundaries for one dimension: equal-population quantiles refined by 1-D Lloyd-Max
    (reconstruction = cell mean, boundary = midpoint of neighbouring reconstructions)."""
    x = np.sort(np.asarray(x, np.float64))
    lo, hi = float(x[0]), float(x[-1])
    ncell = 1 << nbits
    if nbits == 0 or hi <= lo:
        b = np.full(ncell + 1, lo, dtype=np.float64)
        b[-1] = hi
        if ncell > 1:
            b[1:-1] = np.linspace(lo, hi, ncell + 1)[1:-1]
        return b.astype(np.float32)
    inner = np.quantile(x, np.arange(1, ncell) / ncell)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(iters):
        idx = np.searchsorted(x, inner, side="right")
        edges = np.concatenate([[0], idx, [len(x)]])
        cnt = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        centre_of_edge = (np.concatenate([[lo], inner]) + np.concatenate([inner, [hi]])) / 2
        rec = np.where(cnt > 0, sums / np.maximum(cnt, 1), centre_of_edge)
        new = (rec[:-1] + rec[1:]) / 2
        if np.allclose(new, inner):
            break
        inner = np.maximum.accumulate(new)
    b = np.concatenate([[lo], inner, [hi]]).astype(np.float32)
    # float32 rounding must not make an outer bound exclude an extreme value
    b[0] = np.nextafter(b[0], np.float32(-np.inf))
    b[-1] = np.nextafter(b[-1], np.float32(np.inf))
    return b


def fit_partition(
    x: np.ndarray, bits_per_dim: float, sample: int = 20000, seed: int = 0
) -> PartitionQuantizer:
    """Fit the quantizer of one partition (rows already in metric space)."""
    x = np.asarray(x, np.float32)
    n, d = x.shape
    mean = x.mean(axis=0).astype(np.float32)
    xc = (x - mean).astype(np.float64)
    cov = xc.T @ xc / max(n - 1, 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    rot = v[:, order].T.astype(np.float32)
    var = np.maximum(w[order], 0.0)
    budget = int(round(bits_per_dim * d))
    bits, bitoff = pack_bytes(allocate_bits(var, budget), nseg_for(budget))
    xr = (x - mean) @ rot.T
    rng = np.random.default_rng(seed)
    samp = xr if n <= sample else xr[rng.choice(n, sample, replace=False)]
    bounds = []
    for a in range(d):
        b = lloyd_max_bounds(samp[:, a], int(bits[a]))
        b[0] = min(b[0], np.nextafter(np.float32(xr[:, a].min()), np.float32(-np.inf)))
        b[-1] = max(b[-1], np.nextafter(np.float32(xr[:, a].max()), np.float32(np.inf)))
        bounds.append(b)
    return PartitionQuantizer(mean=mean, rot=rot, bits=bits, bitoff=bitoff, bounds=bounds)


def nseg_for(total_bits: int) -> int:
    return (total_bits + 7) // 8


def encode(
    q: PartitionQuantizer,
    x: np.ndarray,
    nseg: int,
    sign_dims: int,
    centre_r: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise codes u8[nseg + 1, n] (one spare zero row for 16-bit reads) and sign bits u32[n].
    Sign bits are taken relative to `centre_r` (each row's list centre, rotated) when given: the
    Hamming distance then compares residual directions around the list, which ranks neighbours
    far better than signs around the partition mean."""
    xr = q.rotate(x)
    cells = q.cells(xr)
    codes = np.zeros((nseg + 1, len(x)), dtype=np.uint8)
    build_kernels.pack_codes(cells, q.bitoff, q.bits, codes)
    return codes, sign_bits(xr if centre_r is None else xr - centre_r, sign_dims)


def sign_bits(xr: np.ndarray, sign_dims: int) -> np.ndarray:
    if not 0 < sign_dims <= MAX_SIGN_DIMS:
        raise ValueError(f"sign_dims must be in 1..{MAX_SIGN_DIMS}, got {sign_dims}")
    pos = (xr[:, :sign_dims] > 0).astype(np.uint64)
    shifts = np.arange(sign_dims, dtype=np.uint64)
    if not len(xr):
        return np.zeros(0, np.uint32)
    return (pos << shifts).sum(axis=1, dtype=np.uint64).astype(np.uint32)
