"""How invocation metadata and handler results are put on the wire (into a slot).

A slot holds `[meta (msgpack, meta_len bytes)][pad to 64][payload]`; the descriptor carries
`meta_len` and `length` (payload bytes). Requests' meta: function, content type, headers,
deadline, idempotency key, invocation id. Replies' meta: status, content type, headers."""

from __future__ import annotations

import json
import sys
import threading

import msgpack

from hearth.sdk import JSON, MSGPACK, NDARRAY, OCTET, Response

TYPE_CHECKING = False  # typing is not imported on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

META_RESERVE = 512  # invoke's request meta is padded to this, so it can be rewritten in place
# (a call started from the read, `Invoker.start_call`, is never rewritten: its meta is unpadded)


_packers = threading.local()  # one Packer per thread: a Packer's buffer is not shareable


def _packer() -> msgpack.Packer:
    """This thread's Packer. ``msgpack.packb`` makes (and frees) a Packer and its buffer on
    every call, twice the time of the packing itself for a small map (issue #16: every
    request and reply meta is packed)."""
    p = _packers.__dict__.get("p")
    if p is None:
        p = _packers.p = msgpack.Packer(use_bin_type=True)
    return p


def pack_meta(meta: dict[str, Any], reserve: int = 0) -> bytes:
    """msgpack meta, zero-padded to `reserve` bytes (the reader takes the first object only)."""
    try:
        b = _packer().pack(meta)
    except BaseException:
        _packers.p = None  # a failed pack may leave bytes in its buffer: start afresh
        raise
    return b + bytes(reserve - len(b)) if len(b) < reserve else b


def unpack_meta(buf: memoryview | bytes) -> dict[str, Any]:
    if len(buf) == 0:
        return {}
    try:
        meta = msgpack.unpackb(buf, raw=False)
    except msgpack.ExtraData as e:  # padded request metadata: the first object is the map
        meta = e.unpacked
    if not isinstance(meta, dict):
        raise ValueError("slot metadata is not a map")
    return meta


def wants_msgpack(headers: dict[str, str]) -> bool:
    accept = headers.get("accept", headers.get("Accept", ""))
    return MSGPACK in accept.lower()


def encode_result(
    result: Any, request_headers: dict[str, str]
) -> tuple[int, str, dict[str, str], Any]:
    """Turn what a handler returned into (status, content type, headers, bytes-like body).

    numpy arrays and memoryviews are returned as buffers (no copy here)."""
    if result.__class__ is bytes:  # the common case first: nothing to look at
        return 200, OCTET, {}, result
    status, ctype, headers = 200, None, {}
    if isinstance(result, Response):
        status, ctype, headers = result.status, result.content_type, dict(result.headers)
        result = result.body
    if result is None:
        return status, ctype or OCTET, headers, b""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return status, ctype or OCTET, headers, result
    if isinstance(result, str):
        return status, ctype or "text/plain; charset=utf-8", headers, result.encode()
    np = sys.modules.get("numpy")  # not imported: the result cannot be an array
    if np is not None and isinstance(result, np.ndarray):
        arr = np.ascontiguousarray(result)
        headers = {
            **headers,
            "x-hearth-dtype": arr.dtype.str,
            "x-hearth-shape": ",".join(map(str, arr.shape)),
        }
        return status, ctype or NDARRAY, headers, memoryview(arr).cast("B")
    if wants_msgpack(request_headers):
        return (
            status,
            ctype or MSGPACK,
            headers,
            msgpack.packb(result, use_bin_type=True, default=_default),
        )
    return status, ctype or JSON, headers, json.dumps(result, default=_default).encode()


def _default(o: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    if isinstance(o, (bytes, memoryview)):
        return bytes(o).hex()
    raise TypeError(f"result of type {type(o).__name__} is not serialisable")


def error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()
