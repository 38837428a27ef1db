"""RaBitQ-style 1-bit codes (Gao & Long, SIGMOD 2024) with one structured rotation shared by the
whole index. No I/O; the search kernel is `rq_kernels.search_batch_rq`, the rotation
`rq_kernels.rotate_rows`.

Why: the per-partition PCA + OSQ quantizer keeps a d x d float rotation per partition and 4-byte
sign codes; at 384+ dimensions both cost too much (memory and time grow with d^2) and prune
poorly. Here every row keeps one bit per (padded) dimension of its *list residual* after a random
orthogonal rotation, plus four floats, and the distance estimate comes with an error bound:

    r = x - c (c: the row's list centroid),  o' = P r / |r|,  b = sign(o'),  x0 = <b, o'> / sqrt(D)
    <r, y> ~= |r| <b, P y> / (sqrt(D) x0)         for any y (here y = q - c, or q for ip)
    |error| <= |r| |y| sqrt(1 - x0^2) / x0 * eps0 / sqrt(D - 1)   (with high probability, eps0 ~ 1.9)

The rotation P is structured: ROUNDS rounds of (random sign flip, random permutation, 64 x 64
Hadamard blocks) on the vector zero-padded to D = 64 * ceil(d / 64): orthogonal, O(D) memory and
O(D log 64) time, the same for every partition, so a query is rotated once per batch, not once per
partition. <b, P y> is read from D/8 byte tables of the rotated query (one lookup per code byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 64
ROUNDS = 3
EPS0 = 1.9  # RaBitQ's confidence constant: the bound fails with probability ~ exp(-eps0^2 / 2)
# per-row factors (rq_fac columns)
F_NORM2 = 0  # |r|^2
F_SCALE = 1  # |r| / (sqrt(D) x0): <r, y> ~= F_SCALE * <b, P y>
F_BPC = 2  # <b, P c>: lets the kernel use one table of P q for every list
F_ERR = 3  # |r| sqrt(1 - x0^2) / (x0 sqrt(D - 1)): error of <r, y> per unit |y| / eps0


def padded_dims(d: int) -> int:
    return BLOCK * -(-d // BLOCK)


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


@dataclass
class Rotation:
    """P = prod over rounds of H_blocks . Perm . diag(flip), applied to zero-padded vectors."""

    flip: np.ndarray  # f32[ROUNDS, D] +-1
    perm: np.ndarray  # i32[ROUNDS, D]

    @property
    def dims(self) -> int:
        return int(self.flip.shape[1])

    @classmethod
    def random(cls, d: int, seed: int = 0) -> Rotation:
        D = padded_dims(d)
        rng = np.random.default_rng(seed)
        flip = rng.choice(np.array([-1.0, 1.0], np.float32), size=(ROUNDS, D))
        perm = np.stack([rng.permutation(D) for _ in range(ROUNDS)]).astype(np.int32)
        return cls(flip.astype(np.float32), perm)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Rotate rows (n, d) -> (n, D), in float32 (compiled: `rq_kernels.rotate_rows`)."""
        from .rq_kernels import rotate_rows

        x = np.ascontiguousarray(x, np.float32)
        out = np.empty((len(x), self.dims), np.float32)
        rotate_rows(x, np.ascontiguousarray(self.flip), np.ascontiguousarray(self.perm), out)
        return out

    def apply_numpy(self, x: np.ndarray) -> np.ndarray:
        """The same rotation in numpy (the reference the compiled one is tested against)."""
        x = np.asarray(x, np.float32)
        n, d = x.shape
        H = _hadamard(BLOCK)
        y = np.zeros((n, self.dims), np.float32)
        y[:, :d] = x
        for t in range(self.flip.shape[0]):
            y = (y * self.flip[t])[:, self.perm[t]]
            y = (y.reshape(n, self.dims // BLOCK, BLOCK) @ H).reshape(n, self.dims)
        return y


def encode(rot: Rotation, x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes u8[n, D/8] (bit t of byte j = sign of rotated residual dim 8j + t) and factors
    f32[n, 4] (F_NORM2, F_SCALE, F_BPC, F_ERR) of rows x around their list centres (n, d)."""
    x = np.asarray(x, np.float32)
    c = np.asarray(centres, np.float32)
    D = rot.dims
    r = x - c
    nr = np.sqrt((r.astype(np.float64) ** 2).sum(1))
    o = rot.apply(r).astype(np.float64)
    on = np.linalg.norm(o, axis=1)
    pos = o > 0
    codes = np.packbits(pos, axis=1, bitorder="little")
    b = np.where(pos, 1.0, -1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        x0 = np.abs(o).sum(1) / (np.sqrt(D) * np.where(on > 0, on, 1.0))
    x0 = np.where(nr > 0, np.clip(x0, 1e-6, 1.0), 1.0)
    pc = rot.apply(c).astype(np.float64)
    fac = np.zeros((len(x), 4), np.float32)
    fac[:, F_NORM2] = nr**2
    fac[:, F_SCALE] = nr / (np.sqrt(D) * x0)
    fac[:, F_BPC] = (b * pc).sum(1)
    fac[:, F_ERR] = nr * np.sqrt(np.maximum(0.0, 1.0 - x0**2)) / (x0 * np.sqrt(max(1, D - 1)))
    return np.ascontiguousarray(codes, dtype=np.uint8), fac


def estimate(
    codes: np.ndarray, fac: np.ndarray, rq: np.ndarray, centre: np.ndarray, q: np.ndarray,
    metric: str = "l2", eps0: float = EPS0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Reference (numpy) estimate and lower bound of the distance (squared l2, or minus the inner
    product) from q to rows with the given codes around one list centre; rq = rot.apply(q).
    The kernel computes the same thing with byte tables; tests compare both with exact values."""
    bits = np.unpackbits(codes, axis=1, bitorder="little")[:, : rq.shape[-1]].astype(np.float64)
    bpq = (2 * bits - 1) @ rq.astype(np.float64)
    q = np.asarray(q, np.float64)
    c = np.asarray(centre, np.float64)
    if metric == "l2":
        y2 = float(((q - c) ** 2).sum())
        est = y2 + fac[:, F_NORM2] - 2 * fac[:, F_SCALE] * (bpq - fac[:, F_BPC])
        err = 2 * eps0 * np.sqrt(y2) * fac[:, F_ERR]
    else:
        est = -(q @ c) - fac[:, F_SCALE] * bpq
        err = eps0 * np.linalg.norm(q) * fac[:, F_ERR]
    return est, est - err
