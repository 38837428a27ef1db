"""The fields of a vecsearch request body, checked: the search params, the internal `_tree`
field a holder passes to its children, and the visit lists a parent holder sent. A bad field
raises QueryError naming it (the handler answers 400)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .index import VecIndex
from .predicates import QueryError
from .query import SearchParams


def as_array(obj: Any, dtype: Any, shape: list[int] | None = None) -> np.ndarray:
    """`obj` as an array: raw bytes (a msgpack hop) viewed in place, anything else converted."""
    if isinstance(obj, bytes | bytearray | memoryview):
        a = np.frombuffer(obj, dtype=dtype)
        return a.reshape(shape) if shape is not None else a
    return np.asarray(obj, dtype=dtype)


def search_params(body: dict[str, Any]) -> SearchParams:
    """`params`: known fields only, each of its type and within its range."""
    p = body.get("params") or {}
    if not isinstance(p, dict):
        raise QueryError("params: expected an object")
    known = set(SearchParams.__dataclass_fields__)
    bad = sorted(set(p) - known)
    if bad:
        raise QueryError(f"params: unknown field(s) {bad} (known: {sorted(known)})")
    out = {}
    for name, value in p.items():
        kind, lo, lo_open, hi = _PARAM_RULES[name]
        out[name] = _num(f"params.{name}", value, kind, lo, lo_open, hi)
    return SearchParams(**out)


# field -> (type, lower bound, lower bound exclusive, upper bound or None)
_PARAM_RULES: dict[str, tuple[type, float, bool, float | None]] = {
    "ratio": (float, 0.0, True, None),
    "coverage": (float, 0.0, False, 1.0),
    "min_candidates": (int, 0, False, None),
    "keep_frac": (float, 0.0, True, 1.0),
    "filter_keep_frac": (float, 0.0, True, 1.0),
    "min_keep": (int, 0, False, None),
    "rerank": (int, 0, False, None),
    "filter_coverage": (float, 0.0, True, None),
    "max_visit": (int, 0, False, None),
    "threads": (int, 0, False, None),
    "recall_target": (float, 0.0, True, 1.0),
    "eps0": (float, 0.0, False, None),
}


def _num(
    what: str, value: Any, kind: type, lo: float, lo_open: bool = False, hi: float | None = None
) -> Any:
    """`value` as an int/float within bounds, or QueryError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        noun = "an integer" if kind is int else "a number"
        raise QueryError(f"{what}: expected {noun}, got {type(value).__name__}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise QueryError(f"{what}: expected an integer, got {value!r}")
        v: Any = int(value)
    else:
        v = float(value)
        if not np.isfinite(v):
            raise QueryError(f"{what}: expected a finite number, got {value!r}")
    if (v <= lo) if lo_open else (v < lo):
        raise QueryError(f"{what}: must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise QueryError(f"{what}: must be <= {hi}, got {value!r}")
    return v


def _int_field(what: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QueryError(f"{what}: expected an integer, got {type(value).__name__}")
    if value < lo:
        raise QueryError(f"{what}: must be >= {lo}, got {value}")
    return value


def tree_of(body: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """This holder's place in the tree: from `_tree` (a hop), else the root's (configuration)."""
    t = body.get("_tree")
    if t is None:
        return {
            "node": 0,
            "holders": max(1, cfg["holders"]),
            "b": max(1, cfg["branching"]),
            "child": cfg["child"],
        }
    # internal hop field, but it arrives in the request body: validate like any other input
    if not isinstance(t, dict):
        raise QueryError(f"_tree: expected an object, got {type(t).__name__}")
    missing = [f for f in ("node", "holders", "b", "child") if f not in t]
    if missing:
        raise QueryError(f"_tree: missing field(s) {missing}")
    holders = _int_field("_tree.holders", t["holders"], 1)
    node = _int_field("_tree.node", t["node"], 0)
    if node >= holders:
        raise QueryError(f"_tree.node: must be < _tree.holders ({holders}), got {node}")
    b = _int_field("_tree.b", t["b"], 1)
    if b > holders:
        raise QueryError(f"_tree.b: must be <= _tree.holders ({holders}), got {b}")
    child = t["child"]
    if not isinstance(child, str) or not child:
        raise QueryError("_tree.child: expected a non-empty string")
    try:
        child.format(node=0)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise QueryError(f"_tree.child: bad name template {child!r} ({e})") from None
    return {"node": node, "holders": holders, "b": b, "child": child}


def visit_plan(
    idx: VecIndex, body: dict[str, Any], Q: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The visit lists a parent holder sent (``order``/``order_shape``/``nvisit``), checked."""
    order = None
    if body.get("order") is not None:
        raw = body["order"]
        if isinstance(raw, bytes | bytearray | memoryview):
            shape = body.get("order_shape")
            if (
                not isinstance(shape, list | tuple)
                or len(shape) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in shape)
            ):
                raise QueryError("order_shape: expected [queries, lists] (two integers >= 0)")
            if shape[0] * shape[1] * 4 != len(bytes(raw)):
                raise QueryError(f"order_shape: {list(shape)} does not match the order bytes")
            order = as_array(raw, np.int32, list(shape))
        else:
            try:
                order = np.asarray(raw, dtype=np.int32)
            except (TypeError, ValueError, OverflowError):
                raise QueryError("order: expected an integer matrix") from None
        if order.ndim != 2 or order.shape[0] != Q or order.shape[1] > idx.n_lists:
            raise QueryError(f"order: expected shape [{Q}, <= {idx.n_lists}]")
        if order.size and (order.min() < 0 or order.max() >= idx.n_lists):
            raise QueryError(f"order: list ids must be in [0, {idx.n_lists})")
    nvisit = None
    if body.get("nvisit") is not None:
        raw = body["nvisit"]
        try:
            nvisit = as_array(raw, np.int32)
        except (TypeError, ValueError, OverflowError):
            raise QueryError("nvisit: expected integers") from None
        if nvisit.ndim != 1 or len(nvisit) != Q:
            raise QueryError(f"nvisit: expected {Q} integers")
        width = order.shape[1] if order is not None else idx.n_lists
        if len(nvisit) and (nvisit.min() < 0 or nvisit.max() > width):
            raise QueryError(f"nvisit: values must be in [0, {width}]")
    return order, nvisit
