"""Units and model sizes shared by the fedavg benchmarks."""

from __future__ import annotations

import numpy as np

GB = 1e9
R18, R152 = 11_210_000, 58_270_000  # parameters of ResNet-18 and ResNet-152
FAN_IN = 4  # the round server's fan-in (fedavg_round_vs_flower.py)


def layer_shapes(total: int, nlayers: int, seed: int) -> list[tuple[int, ...]]:
    """A ResNet-like list of layer sizes summing exactly to ``total``."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(nlayers, 0.6))
    sizes = np.maximum(1, (w * total).astype(np.int64))
    sizes[int(np.argmax(sizes))] += total - int(sizes.sum())
    return [(int(s),) for s in sizes]
