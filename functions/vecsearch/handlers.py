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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from hearth.sdk import MSGPACK, Event, HandlerError, Response

from . import query, storage
from .index import VecIndex
from .predicates import QueryError
from .query import Request, Result
from .request_fields import as_array, search_params, tree_of, visit_plan
from .tree_fanout import Invoke, decode_reply, fan_out, search_tree


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


def _query(
    state: HolderState, body: dict[str, Any], invoke: Invoke | None, cfg: dict[str, Any]
) -> dict[str, Any]:
    idx = state.index
    tree = tree_of(body, cfg)
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
        vectors = as_array(vectors, np.float32, shape)
    req = query.make_request(
        idx,
        vectors,
        body.get("k", 10),
        body.get("filter"),
        body.get("metric"),
        body.get("exact", False),
    )
    params = search_params(body)
    if root:
        # one-pass plan at the root; children receive the truncated visit lists
        qmask = None if req.exact else query.quantized_mask(idx, req.program)
        order, nvisit = (None, None) if req.exact else query.plan(idx, req, params, qmask)
    else:
        order, nvisit = visit_plan(idx, body, len(req.queries))
    res = search_tree(idx, req, body, params, tree, order, nvisit, invoke)
    if not root:
        return {
            "ids": res.ids.tobytes(),
            "dists": res.dists.tobytes(),
            "counts": res.counts.tobytes(),
            "stats": res.stats,
        }

    def run_exact(sub: Request) -> Result:
        return search_tree(idx, sub, body, params, tree, None, None, invoke)

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


def _update(
    state: HolderState, body: dict[str, Any], invoke: Invoke | None, cfg: dict[str, Any], op: str
) -> dict[str, Any]:
    """Apply an insert/delete on this holder and every holder below it (each keeps a full copy of
    the small quantized arrays; partitions are only *searched* by their owner)."""
    tree = tree_of(body, cfg)
    ids = body.get("ids")
    with ThreadPoolExecutor(max(1, tree["b"])) as pool:
        futs = fan_out(lambda c: body | {"_tree": tree | {"node": c}}, tree, invoke, pool)
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
            decode_reply(f.result(), name)
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
