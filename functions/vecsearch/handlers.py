"""`vecsearch` function handlers (hearth.sdk contract).

One function, many instances ("partition holders"). A query enters at holder 0, which plans the
visit (lists by centroid distance, SQUASH's one pass) and fans out as a tree: holder i invokes
holders b*i+1 .. b*i+b through ``context.invoke``, searches its own partitions (p % H == i) while the
children work, and merges top-k on the way back. Holders keep the opened index in module state
(warm retention), so only a cold instance pays for opening and verifying the file.

Request body (JSON or msgpack)::

    {"vectors": [[...], ...], "k": 10, "filter": {...}, "metric": "l2", "exact": false}
    {"op": "insert", "vectors": [[...]], "attrs": {"rank": [...]}, "ids": [...]}
    {"op": "delete", "ids": [...]}
    {"op": "info"}

Configuration (FunctionSpec env): HEARTH_VEC_INDEX (index file, required), HEARTH_VEC_HOLDERS
(default 1), HEARTH_VEC_BRANCHING (default 2), HEARTH_VEC_CHILD (function name template for
children, default "vecsearch"; e.g. "vecsearch-{node}" to pin each holder to its own function).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from hearth.sdk import MSGPACK, Event, HandlerError, Response

from . import query, storage
from .index import VecIndex
from .predicates import QueryError
from .query import Request, Result, SearchParams

Invoke = Callable[[str, Any, str], Any]


@dataclass
class HolderState:
    """What a warm instance keeps between invocations."""

    path: str
    index: VecIndex
    opened_s: float
    invocations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def open(path: str, verify: bool = True) -> HolderState:
        t0 = time.perf_counter()
        idx = storage.load(path, verify=verify)
        return HolderState(path=path, index=idx, opened_s=time.perf_counter() - t0)


_STATE: HolderState | None = None
_STATE_LOCK = threading.Lock()


def _holder() -> tuple[HolderState, bool]:
    """The module-level state (created on the first invocation of a cold instance)."""
    global _STATE
    path = os.environ.get("HEARTH_VEC_INDEX")
    if not path:
        raise HandlerError(
            "vecsearch: HEARTH_VEC_INDEX is not set (path of the index file)", status=500
        )
    with _STATE_LOCK:
        if _STATE is not None and _STATE.path == path:
            return _STATE, False
        try:
            _STATE = HolderState.open(path)
        except storage.IndexFormatError as e:
            raise HandlerError(f"vecsearch: {e}", status=500) from e
        return _STATE, True


def _config() -> dict[str, Any]:
    return {
        "holders": int(os.environ.get("HEARTH_VEC_HOLDERS", "1")),
        "branching": int(os.environ.get("HEARTH_VEC_BRANCHING", "2")),
        "child": os.environ.get("HEARTH_VEC_CHILD", "vecsearch"),
    }


def handle(event: Event) -> Any:
    """Entry point: decode the body, serve it with this instance's warm state."""
    state, cold = _holder()
    body = event.data()
    if isinstance(body, bytes | bytearray | memoryview):
        try:
            body = json.loads(bytes(body))
        except ValueError:
            raise HandlerError("body: expected a JSON or msgpack object", status=400) from None
    if isinstance(body, dict) and "_tree" in body and event.context.caller is None:
        # a tree hop comes only from another holder (a chained call), never from a trigger
        raise HandlerError(
            "_tree: internal field, not accepted from HTTP or queue callers", status=400
        )
    out = serve(state, body, event.context.invoke, _config(), cold=cold)
    if isinstance(body, dict) and "_tree" in body:
        # hop between holders: binary arrays inside, so always msgpack whatever the caller accepts
        return Response(msgpack.packb(out, use_bin_type=True), content_type=MSGPACK)
    return out


# --- the shared code path (platform and in-process tree) ----------------------------------------


def _arr(obj: Any, dtype: Any, shape: list[int] | None = None) -> np.ndarray:
    if isinstance(obj, bytes | bytearray | memoryview):
        a = np.frombuffer(obj, dtype=dtype)
        return a.reshape(shape) if shape is not None else a
    return np.asarray(obj, dtype=dtype)


def _children(node: int, holders: int, b: int) -> list[int]:
    return [c for c in range(b * node + 1, b * node + b + 1) if c < holders]


def _decode_reply(reply: Any, child: str) -> dict[str, Any]:
    status = getattr(reply, "status", 200)
    body = getattr(reply, "body", reply)
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        try:
            body = msgpack.unpackb(raw, raw=False)
        except Exception:
            try:
                body = json.loads(raw)
            except ValueError:
                raise HandlerError(
                    f"vecsearch: child {child} sent an undecodable reply", status=502
                ) from None
    if status >= 400 or not isinstance(body, dict) or "error" in body:
        detail = body.get("error") if isinstance(body, dict) else body
        raise HandlerError(f"vecsearch: child {child} failed: {detail}", status=502)
    return body


def serve(
    state: HolderState, body: Any, invoke: Invoke | None, cfg: dict[str, Any], cold: bool = False
) -> dict[str, Any]:
    """Serve one request on this holder. Raises HandlerError(400) for bad input."""
    t0 = time.perf_counter()
    if not isinstance(body, dict):
        raise HandlerError(f"body: expected an object, got {type(body).__name__}", status=400)
    state.invocations += 1
    op = body.get("op", "query")
    try:
        if op == "query":
            out = _query(state, body, invoke, cfg)
        elif op in ("insert", "delete"):
            out = _update(state, body, invoke, cfg, op)
        elif op == "info":
            out = info(state.index)
        else:
            raise QueryError(
                f"op: unknown operation '{op}' (expected query, insert, delete or info)"
            )
    except QueryError as e:
        raise HandlerError(str(e), status=400) from e
    except ValueError as e:  # insert/delete input problems
        raise HandlerError(str(e), status=400) from e
    out.setdefault("stats", {})
    out["stats"].update(
        {
            "cold": cold,
            "open_s": round(state.opened_s, 4) if cold else 0.0,
            "ms": round((time.perf_counter() - t0) * 1e3, 3),
        }
    )
    return out


def _params(body: dict[str, Any]) -> SearchParams:
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


def _tree_of(body: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
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


def _visit_plan(
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
            order = _arr(raw, np.int32, list(shape))
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
            nvisit = _arr(raw, np.int32)
        except (TypeError, ValueError, OverflowError):
            raise QueryError("nvisit: expected integers") from None
        if nvisit.ndim != 1 or len(nvisit) != Q:
            raise QueryError(f"nvisit: expected {Q} integers")
        width = order.shape[1] if order is not None else idx.n_lists
        if len(nvisit) and (nvisit.min() < 0 or nvisit.max() > width):
            raise QueryError(f"nvisit: values must be in [0, {width}]")
    return order, nvisit


def _fan_out(
    payload_for: Callable[[int], dict[str, Any]],
    tree: dict[str, Any],
    invoke: Invoke | None,
    pool: ThreadPoolExecutor,
) -> list[Any]:
    kids = _children(tree["node"], tree["holders"], tree["b"])
    if kids and invoke is None:
        raise HandlerError("vecsearch: this runtime cannot invoke child holders", status=500)
    futs = []
    for c in kids:
        name = tree["child"].format(node=c)
        data = msgpack.packb(payload_for(c), use_bin_type=True)
        futs.append((name, pool.submit(invoke, name, data, MSGPACK)))
    return futs


def _query(
    state: HolderState, body: dict[str, Any], invoke: Invoke | None, cfg: dict[str, Any]
) -> dict[str, Any]:
    idx = state.index
    tree = _tree_of(body, cfg)
    root = "_tree" not in body
    vectors = body.get("vectors")
    if vectors is None:
        raise QueryError("vectors: required")
    if isinstance(vectors, bytes | bytearray | memoryview):
        shape = body.get("shape")
        if shape is not None and (
            not isinstance(shape, list | tuple)
            or any(isinstance(x, bool) or not isinstance(x, int) for x in shape)
        ):
            raise QueryError("shape: expected a list of integers")
        vectors = _arr(vectors, np.float32, shape)
    req = query.make_request(
        idx,
        vectors,
        body.get("k", 10),
        body.get("filter"),
        body.get("metric"),
        body.get("exact", False),
    )
    params = _params(body)
    if root:
        # one-pass plan at the root; children receive the truncated visit lists
        qmask = None if req.exact else query.quantized_mask(idx, req.program)
        order, nvisit = (None, None) if req.exact else query.plan(idx, req, params, qmask)
    else:
        order, nvisit = _visit_plan(idx, body, len(req.queries))
    res = _search_tree(state, req, body, params, tree, order, nvisit, invoke)
    if not root:
        return {
            "ids": res.ids.tobytes(),
            "dists": res.dists.tobytes(),
            "counts": res.counts.tobytes(),
            "stats": res.stats,
        }

    def run_exact(sub: Request) -> Result:
        return _search_tree(state, sub, body, params, tree, None, None, invoke)

    res = query.complete(idx, req, res, run_exact)
    results = res.to_json()
    if idx.labels is not None:
        pos = idx.position_of()
        for row in results:
            row["labels"] = [idx.labels[pos[i]] for i in row["ids"]]
    return {
        "results": results,
        "stats": res.stats | {"holders": tree["holders"], "branching": tree["b"]},
    }


def _search_tree(state, req: Request, body, params, tree, order, nvisit, invoke) -> Result:
    idx = state.index
    Q = len(req.queries)
    vis = int(nvisit.max()) if nvisit is not None and len(nvisit) else 0

    def payload_for(c: int) -> dict[str, Any]:
        return {
            "op": "query",
            "vectors": np.ascontiguousarray(req.queries, np.float32).tobytes(),
            "shape": [Q, idx.dims],
            "k": req.k,
            "filter": req.filter,
            "metric": req.metric,
            "exact": req.exact,
            "params": body.get("params"),
            "order": None if order is None else np.ascontiguousarray(order[:, :vis]).tobytes(),
            "order_shape": [Q, vis],
            "nvisit": None if nvisit is None else np.ascontiguousarray(nvisit, np.int32).tobytes(),
            "_tree": tree | {"node": c},
        }

    owned = (np.arange(idx.n_partitions) % tree["holders"] == tree["node"]).astype(np.uint8)
    with ThreadPoolExecutor(max(1, tree["b"])) as pool:
        futs = _fan_out(payload_for, tree, invoke, pool)
        mine = query.search_owned(idx, req, owned, params, order, nvisit)
        parts = [mine]
        for name, f in futs:
            r = _decode_reply(f.result(), name)
            parts.append(
                Result(
                    ids=_arr(r["ids"], np.int64, [Q, req.k]),
                    dists=_arr(r["dists"], np.float32, [Q, req.k]),
                    counts=_arr(r["counts"], np.int64),
                    stats=r.get("stats", {}),
                )
            )
    merged = query.merge(parts, req.k)
    merged.stats["holders_reached"] = int(sum(p.stats.get("holders_reached", 1) for p in parts))
    return merged


def _update(
    state: HolderState, body: dict[str, Any], invoke: Invoke | None, cfg: dict[str, Any], op: str
) -> dict[str, Any]:
    """Apply an insert/delete on this holder and every holder below it (each keeps a full copy of
    the small quantized arrays; partitions are only *searched* by their owner)."""
    tree = _tree_of(body, cfg)
    ids = body.get("ids")
    with ThreadPoolExecutor(max(1, tree["b"])) as pool:
        futs = _fan_out(lambda c: body | {"_tree": tree | {"node": c}}, tree, invoke, pool)
        with state.lock:
            if op == "insert":
                vectors = body.get("vectors")
                if vectors is None:
                    raise QueryError("vectors: required for insert")
                new = state.index.insert(
                    np.asarray(vectors, np.float32), body.get("attrs") or {}, ids
                )
                out: dict[str, Any] = {"inserted": len(new), "ids": [int(i) for i in new]}
            else:
                if ids is None:
                    raise QueryError("ids: required for delete")
                out = {"deleted": state.index.delete(ids)}
            if body.get("persist") and tree["node"] == 0:
                storage.save(state.index, state.path)
                out["persisted"] = True
        for name, f in futs:
            _decode_reply(f.result(), name)
    return out


def info(idx: VecIndex) -> dict[str, Any]:
    mem = idx.memory_bytes()
    return {
        "dims": idx.dims,
        "metric": idx.metric,
        "quantizer": idx.quantizer,
        "bits_per_dim": idx.bits_per_dim,
        "format_version": storage.FORMAT_VERSION,
        "rows": idx.n_rows,
        "live": idx.n_live,
        "partitions": idx.n_partitions,
        "lists": idx.n_lists,
        "partition_sizes": [int(x) for x in idx.partition_sizes()],
        "sign_dims": idx.sign_dims,
        "attributes": [
            {"name": a.name, "kind": a.kind, "cells": a.ncells()} for a in idx.attributes
        ],
        "memory_bytes": mem,
        "bytes_per_vector": round(idx.bytes_per_vector(), 2),
        "build": idx.build_info,
    }
