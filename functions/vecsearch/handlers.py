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
    return SearchParams(**p)


def _tree_of(body: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    t = body.get("_tree")
    if t is None:
        return {
            "node": 0,
            "holders": max(1, cfg["holders"]),
            "b": max(1, cfg["branching"]),
            "child": cfg["child"],
        }
    return t


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
        vectors = _arr(vectors, np.float32, body.get("shape"))
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
        order = (
            _arr(body["order"], np.int32, body["order_shape"])
            if body.get("order") is not None
            else None
        )
        nvisit = _arr(body["nvisit"], np.int32) if body.get("nvisit") is not None else None
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
