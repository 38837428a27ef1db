"""Attribute predicates: parse a JSON-able filter, compile it to a postfix program for the kernels
(exact check on raw values) and to per-leaf allowed-cell tables (superset check on codes).

Grammar::

    filter := {"and": [filter, ...]} | {"or": [filter, ...]} | leaf
    leaf   := {"attr": NAME, OP: VALUE, ...}      several ops in one leaf are AND-ed
    OP     := eq | in | lt | le | gt | ge | between   (le/ge also as lte/gte; between: [lo, hi])

Categorical attributes accept eq and in only. Malformed filters raise QueryError naming the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import row_kernels
from .attributes import AttributeSpec

OPS = ("eq", "in", "lt", "le", "lte", "gt", "ge", "gte", "between")


class QueryError(ValueError):
    """A query was rejected; the message names the offending field."""


@dataclass
class Leaf:
    attr: int
    kind: int  # row_kernels.LEAF_RANGE / LEAF_IN
    lo: float = -math.inf
    hi: float = math.inf
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class Program:
    """Compiled filter. Empty `prog` = no filter."""

    prog: np.ndarray  # i64[T, 2] (opcode, leaf index)
    leaf_attr: np.ndarray
    leaf_kind: np.ndarray
    leaf_lo: np.ndarray
    leaf_hi: np.ndarray
    leaf_set_off: np.ndarray
    leaf_set_len: np.ndarray
    sets: np.ndarray
    allowed: np.ndarray  # u8[L, 256]

    @property
    def empty(self) -> bool:
        return self.prog.shape[0] == 0

    def exact_args(self) -> tuple:
        return (
            self.prog,
            self.leaf_attr,
            self.leaf_kind,
            self.leaf_lo,
            self.leaf_hi,
            self.leaf_set_off,
            self.leaf_set_len,
            self.sets,
        )


def _num(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise QueryError(f"{path}: expected a number, got {type(v).__name__} {v!r}")
    if math.isnan(v):
        raise QueryError(f"{path}: NaN is not a valid bound")
    return float(v)


def _leaf(node: dict, path: str, attrs: list[AttributeSpec], leaves: list[Leaf]) -> list:
    name = node.get("attr")
    if not isinstance(name, str):
        raise QueryError(f"{path}.attr: expected an attribute name (string), got {name!r}")
    names = [a.name for a in attrs]
    if name not in names:
        raise QueryError(
            f"{path}.attr: unknown attribute '{name}' (known: {', '.join(names) or 'none'})"
        )
    ai = names.index(name)
    spec = attrs[ai]
    ops = [key for key in node if key != "attr"]
    if not ops:
        raise QueryError(
            f"{path}: leaf on '{name}' has no operator (expected one of {', '.join(OPS)})"
        )
    for key in ops:
        if key not in OPS:
            raise QueryError(f"{path}: unknown operator '{key}' (expected one of {', '.join(OPS)})")
    out: list = []
    for key in ops:
        v = node[key]
        p = f"{path}.{key}"
        if spec.kind == "categorical":
            if key not in ("eq", "in"):
                raise QueryError(f"{p}: attribute '{name}' is categorical; only eq and in apply")
            vals = [v] if key == "eq" else v
            if key == "in" and (not isinstance(v, list) or not v):
                raise QueryError(f"{p}: expected a non-empty list")
            ids = spec.raw_values([str(x) for x in vals], grow=False)
            leaves.append(Leaf(ai, row_kernels.LEAF_IN, values=np.unique(ids)))
        elif key == "in":
            if not isinstance(v, list) or not v:
                raise QueryError(f"{p}: expected a non-empty list")
            vals = np.array([_num(x, f"{p}[{j}]") for j, x in enumerate(v)], dtype=np.float64)
            leaves.append(Leaf(ai, row_kernels.LEAF_IN, values=np.unique(vals)))
        elif key == "eq":
            x = _num(v, p)
            leaves.append(Leaf(ai, row_kernels.LEAF_RANGE, lo=x, hi=x))
        elif key == "between":
            if not isinstance(v, list) or len(v) != 2:
                raise QueryError(f"{p}: expected [lo, hi]")
            lo, hi = _num(v[0], f"{p}[0]"), _num(v[1], f"{p}[1]")
            leaves.append(Leaf(ai, row_kernels.LEAF_RANGE, lo=lo, hi=hi))
        else:
            x = _num(v, p)
            if key == "lt":
                leaves.append(Leaf(ai, row_kernels.LEAF_RANGE, hi=float(np.nextafter(x, -np.inf))))
            elif key in ("le", "lte"):
                leaves.append(Leaf(ai, row_kernels.LEAF_RANGE, hi=x))
            elif key == "gt":
                leaves.append(Leaf(ai, row_kernels.LEAF_RANGE, lo=float(np.nextafter(x, np.inf))))
            else:
                leaves.append(Leaf(ai, row_kernels.LEAF_RANGE, lo=x))
        out.append((row_kernels.OP_LEAF, len(leaves) - 1))
    for _ in range(len(ops) - 1):
        out.append((row_kernels.OP_AND, 0))
    return out


def _walk(
    node: Any, path: str, attrs: list[AttributeSpec], leaves: list[Leaf], depth: int = 0
) -> list:
    if depth > 32:
        raise QueryError(f"{path}: filter nested too deeply (max 32)")
    if not isinstance(node, dict):
        raise QueryError(f"{path}: expected an object, got {type(node).__name__}")
    for op, code in (("and", row_kernels.OP_AND), ("or", row_kernels.OP_OR)):
        if op in node:
            if len(node) != 1:
                extra = sorted(k for k in node if k != op)
                raise QueryError(f"{path}: '{op}' must be the only key (also got {extra})")
            kids = node[op]
            if not isinstance(kids, list) or not kids:
                raise QueryError(f"{path}.{op}: expected a non-empty list of filters")
            out: list = []
            for j, kid in enumerate(kids):
                out += _walk(kid, f"{path}.{op}[{j}]", attrs, leaves, depth + 1)
            out += [(code, 0)] * (len(kids) - 1)
            return out
    if "attr" not in node:
        raise QueryError(
            f"{path}: expected 'and', 'or' or a leaf with 'attr' (got keys {sorted(node)})"
        )
    return _leaf(node, path, attrs, leaves)


def compile_filter(flt: Any, attrs: list[AttributeSpec]) -> Program:
    """Parse and compile; ``None`` or ``{}`` means no filter."""
    leaves: list[Leaf] = []
    prog = [] if flt is None or flt == {} else _walk(flt, "filter", attrs, leaves)
    sets = [lf.values for lf in leaves]
    offs = np.cumsum([0] + [len(s) for s in sets])[:-1] if leaves else np.zeros(0, np.int64)
    allowed = np.zeros((max(1, len(leaves)), 256), dtype=np.uint8)
    for j, lf in enumerate(leaves):
        spec = attrs[lf.attr]
        if lf.kind == row_kernels.LEAF_IN:
            allowed[j] = spec.allowed_values(lf.values)
        else:
            allowed[j] = spec.allowed_range(lf.lo, lf.hi)
    return Program(
        prog=np.asarray(prog, dtype=np.int64).reshape(-1, 2),
        leaf_attr=np.asarray([lf.attr for lf in leaves], dtype=np.int64),
        leaf_kind=np.asarray([lf.kind for lf in leaves], dtype=np.int64),
        leaf_lo=np.asarray([lf.lo for lf in leaves], dtype=np.float64),
        leaf_hi=np.asarray([lf.hi for lf in leaves], dtype=np.float64),
        leaf_set_off=np.asarray(offs, dtype=np.int64),
        leaf_set_len=np.asarray([len(s) for s in sets], dtype=np.int64),
        sets=np.concatenate(sets).astype(np.float64) if sets else np.zeros(0, np.float64),
        allowed=allowed,
    )
