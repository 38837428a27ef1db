"""Attribute quantization (SQUASH): each attribute becomes an 8-bit cell id per row so a predicate
can be answered on codes as a *superset* of the true matches (never dropping one), then checked
exactly on the raw values during re-rank.

Numeric: up to 256 cells from equal-population quantiles; cell c holds values in
[edges[c-1], edges[c]) with -inf/+inf at the ends, so any future value has a cell.
Categorical: a dictionary of categories -> ids (stored as float ids in the raw column);
cell = id % 256 (exact when there are at most 256 categories).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NCELLS = 256


@dataclass
class AttributeSpec:
    name: str
    kind: str  # "numeric" | "categorical"
    edges: list[float] = field(default_factory=list)  # numeric: sorted interior edges (<= 255)
    categories: list[str] = field(default_factory=list)  # categorical: id -> label

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "edges": self.edges,
            "categories": self.categories,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> AttributeSpec:
        return AttributeSpec(
            d["name"], d["kind"], list(d.get("edges", [])), list(d.get("categories", []))
        )

    # --- values -> raw column and codes ----------------------------------------------------
    def raw_values(self, values: Any, grow: bool = True) -> np.ndarray:
        """Raw column as float64 (categorical: category ids, new labels appended if `grow`)."""
        if self.kind == "numeric":
            try:
                arr = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"attribute '{self.name}' is numeric but got non-numeric values"
                ) from e
            if np.isnan(arr).any():
                raise ValueError(f"attribute '{self.name}' has NaN values")
            return arr
        lookup = {c: i for i, c in enumerate(self.categories)}
        out = np.empty(len(values), dtype=np.float64)
        for j, v in enumerate(values):
            key = str(v)
            if key not in lookup:
                if not grow:
                    out[j] = -1
                    continue
                lookup[key] = len(self.categories)
                self.categories.append(key)
            out[j] = lookup[key]
        return out

    def codes(self, raw: np.ndarray) -> np.ndarray:
        if self.kind == "numeric":
            return np.searchsorted(np.asarray(self.edges, np.float64), raw, side="right").astype(
                np.uint8
            )
        return (raw.astype(np.int64) % NCELLS).astype(np.uint8)

    # --- predicate leaves -> allowed cells (superset) ------------------------------------------
    def allowed_range(self, lo: float, hi: float) -> np.ndarray:
        """Cells that may contain a value in [lo, hi] (closed; open ends are handled by the caller
        widening to the nearest representable value, which only adds cells)."""
        allowed = np.zeros(NCELLS, dtype=np.uint8)
        if lo > hi:
            return allowed
        if self.kind == "numeric":
            e = np.asarray(self.edges, np.float64)
            c_lo = int(np.searchsorted(e, lo, side="right"))
            c_hi = int(np.searchsorted(e, hi, side="right"))
            allowed[c_lo : c_hi + 1] = 1
        else:
            ids = np.arange(len(self.categories))
            ids = ids[(ids >= lo) & (ids <= hi)]
            allowed[ids % NCELLS] = 1
        return allowed

    def allowed_values(self, values: np.ndarray) -> np.ndarray:
        allowed = np.zeros(NCELLS, dtype=np.uint8)
        values = values[values >= 0] if self.kind == "categorical" else values
        if len(values):
            allowed[self.codes(values)] = 1
        return allowed

    def ncells(self) -> int:
        return (
            len(self.edges) + 1
            if self.kind == "numeric"
            else min(NCELLS, max(1, len(self.categories)))
        )


def fit_attribute(name: str, values: Any) -> tuple[AttributeSpec, np.ndarray]:
    """Choose numeric vs categorical from the values and fit the cells. Returns (spec, raw column)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "biuf":
        spec = AttributeSpec(name, "numeric")
        raw = spec.raw_values(arr)
        uniq = np.unique(raw)
        if len(uniq) <= NCELLS:
            # one cell per distinct value: predicates on codes are then exact
            edges = uniq[1:]
        else:
            edges = np.unique(np.quantile(raw, np.arange(1, NCELLS) / NCELLS, method="lower"))
            edges = edges[edges > raw.min()]
        spec.edges = [float(v) for v in edges]
        return spec, raw
    spec = AttributeSpec(name, "categorical")
    raw = spec.raw_values([str(v) for v in arr])
    return spec, raw
