"""Exactness of the round benchmark's models: float64 FedAvg of the ClientApp's updates."""

from __future__ import annotations

import numpy as np


def exact_model(m, n: int, params: int, rnd: int) -> list[np.ndarray]:
    """Float64 FedAvg of the ClientApp's updates (one client's arrays in memory at a time)."""
    sums = [np.zeros(size, np.float64) for size in m.layer_sizes(params)]
    total = sum(m.num_examples(i, rnd) for i in range(n))
    for i in range(n):
        for s, a in zip(sums, m.update_arrays(i, params), strict=True):
            s += a.astype(np.float64) * m.num_examples(i, rnd)
        m._CACHE.clear()
    return [s / total for s in sums]


def model_arrays(payload: bytes) -> list[np.ndarray]:
    """The layers of a packed global model."""
    from hearth.functions.fedavg.aggregation import parse_model

    return [a for _n, a in parse_model(memoryview(payload)).layers]


def max_rel_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest |got - want| of a layer relative to the layer's largest |want| (normwise: an
    element-wise ratio is meaningless where a float32 sum cancels to ~0)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        d = float(np.abs(g.astype(np.float64) - w).max()) / max(float(np.abs(w).max()), 1e-30)
        worst = max(worst, d)
    return worst
