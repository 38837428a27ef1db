"""One set of the fold benchmark: its model layout, slot pool and the updates in their slots."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import DEFAULT_TRIM_THRESHOLD
from hearth.functions.fedavg.aggregation import Ingested
from hearth.functions.fedavg.pack import PREFIX, Header, LayerSpec, Layout, packed_size
from hearth.functions.fedavg.tree import TreePlan, plan_tree

from fedavg.sizes import layer_shapes


@dataclass
class FoldSet:
    """What every stage of a set reads: ``nclients`` updates of ``params`` float32 parameters
    in ``nlayers`` layers, one slot each in ``pool``, weighted by ``counts``."""

    name: str
    nclients: int
    params: int
    nlayers: int
    fan_in: int
    shapes: list[tuple[int, ...]]
    layout: Layout
    slot_size: int
    plan: TreePlan
    pool: SlotPool
    counts: list[int]

    @property
    def nbytes(self) -> int:
        """Update bytes of a round."""
        return self.nclients * self.params * 4


def open_set(
    name: str, nclients: int, params: int, nlayers: int, fan_in: int, seed: int
) -> tuple[FoldSet, np.random.Generator]:
    """The set's layout, tree and pool, and the generator its update values come from next."""
    shapes = layer_shapes(params, nlayers, seed)
    layout = Layout(
        tuple(LayerSpec(f"layer{i}", np.dtype(np.float32), s) for i, s in enumerate(shapes))
    )
    slot_size = (
        -(-(packed_size(Header("update", 10**9, layout, 10**6, "c" * 16)) + 4096) // 4096) * 4096
    )
    plan_tree_ = plan_tree(nclients, fan_in=fan_in)
    # one slot per update (+2 spare); accumulators and kept models live in private memory
    pool = SlotPool.create(
        f"hearth-fedavg-bench-{uuid.uuid4().hex[:8]}",
        [(1 << 16, 64), (slot_size, nclients + 2)],
        trim_threshold=DEFAULT_TRIM_THRESHOLD,  # the platform's default; rounds below vary it
    )
    rng = np.random.default_rng(seed)
    counts = [int(x) for x in rng.integers(100, 5000, nclients)]
    fs = FoldSet(
        name, nclients, params, nlayers, fan_in, shapes, layout, slot_size, plan_tree_, pool, counts
    )
    return fs, rng


@dataclass
class Updates:
    """A round's updates where every contender reads them: in their slots (``slots``: to
    release at the end; the contenders reuse the items without them)."""

    items: list[Ingested]
    slots: list
    data_off: list[int]
    flat: list[np.ndarray]  # each update's data, one float32 array
    views: list[list[np.ndarray]]  # ... and its layers (Flower's input)


def updates_in_slots(fs: FoldSet, items: list[Ingested], final: list) -> Updates:
    """The last gateway round's slots (``final``) as the items the contenders fold."""
    items = [
        Ingested(p.slot.buf[p.offset : p.offset + p.length], it.node, it.client, p.slot)
        for it, p in zip(items, final, strict=True)
    ]
    slots = [it.slot for it in items]
    data_off = [PREFIX.unpack_from(it.view, 0)[4] for it in items]
    flat = [
        np.frombuffer(it.view, np.float32, count=fs.params, offset=d)
        for it, d in zip(items, data_off, strict=True)
    ]
    shapes = fs.shapes
    views = [
        [
            f[o : o + s[0]]
            for o, s in zip(np.cumsum([0] + [s[0] for s in shapes[:-1]]), shapes, strict=True)
        ]
        for f in flat
    ]
    return Updates(items, slots, data_off, flat, views)
