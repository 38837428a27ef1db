"""Wire format of an FL payload: one contiguous buffer = fixed prefix + msgpack header + data.

Why one buffer: an update (or a partial sum, or a global model) must land in *one* shared-memory
slot and be read in place through numpy views; nothing is pickled and nothing is copied.

Layout (little endian)::

    0   4s  magic  b"HFL1"
    4   u16 version (1)
    6   u16 reserved
    8   u32 header length (msgpack bytes that follow at offset 16)
    12  u32 data offset (64-byte aligned, >= 16 + header length)
    16  msgpack header: {"kind": "update"|"partial"|"model", "n": int, "round": int|None,
                         "client": str|None, "acc": dtype str (partials only),
                         "layers": [[name, dtype, shape], ...]}
    data_off ...  data

For ``update`` and ``model`` payloads the layers are stored one after another in their own dtype,
each at an offset aligned to its item size (consecutive layers of one dtype are therefore
contiguous and folded as one flat run). For ``partial`` payloads the data is one flat
accumulator array (dtype ``acc``) of all elements; the layer list keeps the *output* structure.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack
import numpy as np

MAGIC = b"HFL1"
VERSION = 1
PREFIX = struct.Struct("<4sHHII")
KINDS = ("update", "partial", "model")
ALIGN = 64
#: dtypes an update layer may have. Integer layers (e.g. BatchNorm counters) are averaged as
#: Flower does (the result is float64); anything else is refused.
FLOAT_KINDS = "f"
INT_KINDS = "iub"


class PackError(ValueError):
    """A payload or a model structure is malformed; the message names the field or layer."""


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def output_dtype(dt: np.dtype) -> np.dtype:
    """The dtype FedAvg yields for a layer of dtype ``dt`` (Flower's ``layer * n / N`` rule)."""
    if dt.kind == "f":
        return dt
    return np.dtype(np.float64)


@dataclass(frozen=True)
class LayerSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @cached_property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


@dataclass(frozen=True)
class Run:
    """Consecutive layers of one dtype stored back to back: folded as one flat array."""

    byte_offset: int  # in the data region
    elem_offset: int  # in the flat accumulator
    count: int
    dtype: np.dtype


@dataclass(frozen=True)
class Layout:
    """The structure of a model: ordered named layers. Hashable, cheap to compare."""

    layers: tuple[LayerSpec, ...]

    @cached_property
    def byte_offsets(self) -> tuple[int, ...]:
        offs, pos = [], 0
        for ly in self.layers:
            pos = _align(pos, ly.dtype.itemsize)
            offs.append(pos)
            pos += ly.nbytes
        return tuple(offs)

    @cached_property
    def elem_offsets(self) -> tuple[int, ...]:
        offs, pos = [], 0
        for ly in self.layers:
            offs.append(pos)
            pos += ly.size
        return tuple(offs)

    @property
    def total(self) -> int:
        """Number of scalar parameters."""
        return sum(ly.size for ly in self.layers)

    @property
    def data_nbytes(self) -> int:
        if not self.layers:
            return 0
        return self.byte_offsets[-1] + self.layers[-1].nbytes

    @cached_property
    def runs(self) -> tuple[Run, ...]:
        out: list[Run] = []
        for ly, bo, eo in zip(self.layers, self.byte_offsets, self.elem_offsets, strict=True):
            if ly.size == 0:
                continue
            if out:
                last = out[-1]
                if (
                    last.dtype == ly.dtype
                    and last.byte_offset + last.count * last.dtype.itemsize == bo
                ):
                    out[-1] = Run(
                        last.byte_offset, last.elem_offset, last.count + ly.size, last.dtype
                    )
                    continue
            out.append(Run(bo, eo, ly.size, ly.dtype))
        return tuple(out)

    @property
    def names(self) -> list[str]:
        return [ly.name for ly in self.layers]

    def with_dtype(self, fn) -> Layout:
        return Layout(
            tuple(LayerSpec(ly.name, np.dtype(fn(ly.dtype)), ly.shape) for ly in self.layers)
        )

    def output(self) -> Layout:
        """The structure of the averaged model (float layers keep their dtype)."""
        return self.with_dtype(output_dtype)

    def mismatch(self, other: Layout) -> str | None:
        """Why ``other`` cannot be folded into a model of this structure (None if it can)."""
        if len(other.layers) != len(self.layers):
            return f"expected {len(self.layers)} layers, got {len(other.layers)}"
        for i, (a, b) in enumerate(zip(self.layers, other.layers, strict=True)):
            if a.name != b.name:
                return f"layer {i}: expected name {a.name!r}, got {b.name!r}"
            if a.shape != b.shape:
                return f"layer {a.name!r}: expected shape {a.shape}, got {b.shape}"
        return None

    def to_wire(self) -> list[list[Any]]:
        return [[ly.name, ly.dtype.str, list(ly.shape)] for ly in self.layers]

    @classmethod
    def from_wire(cls, items: Any) -> Layout:
        if not isinstance(items, list):
            raise PackError("header.layers: expected a list of [name, dtype, shape]")
        layers = []
        for i, it in enumerate(items):
            if not (isinstance(it, list | tuple) and len(it) == 3):
                raise PackError(f"header.layers[{i}]: expected [name, dtype, shape]")
            name, dt, shape = it
            layers.append(_layer_spec(i, name, dt, shape))
        return cls(tuple(layers))

    @classmethod
    def of(cls, model: Any) -> Layout:
        """The layout of a model given as an array, a list of arrays, pairs or a mapping."""
        return cls(tuple(LayerSpec(n, a.dtype, a.shape) for n, a in named_layers(model)))


def _layer_spec(i: int, name: Any, dt: Any, shape: Any) -> LayerSpec:
    if not isinstance(name, str):
        raise PackError(f"header.layers[{i}].name: expected a string")
    try:
        dtype = np.dtype(dt)
    except TypeError:
        raise PackError(f"header.layers[{i}] ({name!r}).dtype: unknown dtype {dt!r}") from None
    if dtype.kind not in FLOAT_KINDS + INT_KINDS:
        raise PackError(f"layer {name!r}: dtype {dtype} is not numeric (need float or int)")
    if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise PackError(
            f"header.layers[{i}] ({name!r}).shape: expected a list of non-negative ints"
        )
    return LayerSpec(name, dtype, tuple(shape))


def named_layers(model: Any) -> list[tuple[str, np.ndarray]]:
    """Normalise a model to ``[(name, array)]``.

    Accepts one array (a flat model, name ``"w"``), a list of arrays (Flower ``NDArrays``;
    names ``"0"``, ``"1"``, ...), a list of ``(name, array)`` pairs, or a mapping.
    """
    if isinstance(model, np.ndarray):
        items: Iterable[tuple[str, Any]] = [("w", model)]
    elif isinstance(model, Mapping):
        items = list(model.items())
    elif isinstance(model, Sequence) and not isinstance(model, str | bytes):
        seq = list(model)
        if seq and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in seq):
            items = seq
        else:
            items = [(str(i), x) for i, x in enumerate(seq)]
    else:
        raise PackError(
            f"model: expected an array, a list of arrays or (name, array) pairs, got {type(model).__name__}"
        )
    out = []
    seen = set()
    for name, arr in items:
        if not isinstance(arr, np.ndarray):
            raise PackError(f"layer {name!r}: expected a numpy array, got {type(arr).__name__}")
        if arr.dtype.kind not in FLOAT_KINDS + INT_KINDS:
            raise PackError(f"layer {name!r}: dtype {arr.dtype} is not numeric (need float or int)")
        if name in seen:
            raise PackError(f"layer {name!r}: duplicate layer name")
        seen.add(name)
        out.append((str(name), arr))
    return out


@dataclass(frozen=True)
class Header:
    kind: str
    n: int
    layout: Layout
    round: int | None = None
    client: str | None = None
    acc: np.dtype | None = None  # partials: dtype of the flat accumulator data

    def to_wire(self) -> dict[str, Any]:
        h: dict[str, Any] = {
            "kind": self.kind,
            "n": self.n,
            "round": self.round,
            "client": self.client,
            "layers": self.layout.to_wire(),
        }
        if self.acc is not None:
            h["acc"] = self.acc.str
        return h

    @property
    def data_nbytes(self) -> int:
        if self.kind == "partial":
            assert self.acc is not None
            return self.layout.total * self.acc.itemsize
        return self.layout.data_nbytes


def header_bytes(h: Header) -> bytes:
    return msgpack.packb(h.to_wire(), use_bin_type=True)


def data_offset_for(hb_len: int) -> int:
    return _align(PREFIX.size + hb_len)


def packed_size(h: Header) -> int:
    """Bytes needed for the whole payload (allocate a slot of this size)."""
    return data_offset_for(len(header_bytes(h))) + h.data_nbytes


def write_header(buf: memoryview | bytearray, h: Header, data_off: int | None = None) -> int:
    """Write prefix + header at the start of ``buf``; returns the data offset.

    ``data_off`` may reserve more room than needed (a partial's header is rewritten in front of
    an accumulator whose position is fixed)."""
    hb = header_bytes(h)
    need = data_offset_for(len(hb))
    if data_off is None:
        data_off = need
    elif data_off < need or data_off % ALIGN:
        raise PackError(f"header of {len(hb)} bytes does not fit before data offset {data_off}")
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    if len(mv) < data_off + h.data_nbytes:
        raise PackError(
            f"buffer of {len(mv)} bytes is too small for the payload ({data_off + h.data_nbytes} bytes)"
        )
    PREFIX.pack_into(mv, 0, MAGIC, VERSION, 0, len(hb), data_off)
    mv[PREFIX.size : PREFIX.size + len(hb)] = hb
    return data_off


def pack_into(
    buf: memoryview | bytearray,
    model: Any,
    n: int,
    *,
    kind: str = "update",
    round: int | None = None,
    client: str | None = None,
) -> int:
    """Write a model (update or global model) into ``buf`` (e.g. a slot); returns bytes used.

    This is the single copy of the data: from the caller's arrays into the payload buffer."""
    layers = named_layers(model)
    layout = Layout(tuple(LayerSpec(nm, a.dtype, a.shape) for nm, a in layers))
    h = Header(kind, int(n), layout, round, client)
    off = write_header(buf, h)
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    for (_, arr), bo, ly in zip(layers, layout.byte_offsets, layout.layers, strict=True):
        if ly.size:
            dst = np.frombuffer(mv, dtype=ly.dtype, count=ly.size, offset=off + bo).reshape(
                ly.shape
            )
            np.copyto(dst, arr, casting="no")
    return off + layout.data_nbytes


def pack(
    model: Any, n: int, *, kind: str = "update", round: int | None = None, client: str | None = None
) -> bytearray:
    """A packed payload in fresh memory (client side; use :func:`pack_into` to fill a slot)."""
    layers = named_layers(model)
    h = Header(
        kind,
        int(n),
        Layout(tuple(LayerSpec(nm, a.dtype, a.shape) for nm, a in layers)),
        round,
        client,
    )
    buf = bytearray(packed_size(h))
    pack_into(buf, layers, n, kind=kind, round=round, client=client)
    return buf


@dataclass(frozen=True)
class Payload:
    """A parsed payload: header plus a zero-copy view of the data region."""

    header: Header
    data: memoryview  # exactly header.data_nbytes bytes, a view of the original buffer

    def layers(self) -> list[tuple[str, np.ndarray]]:
        """Zero-copy numpy views of each layer (update/model payloads)."""
        if self.header.kind == "partial":
            raise PackError("a partial payload holds a flat accumulator, not layers")
        lay = self.header.layout
        return [
            (
                ly.name,
                np.frombuffer(self.data, dtype=ly.dtype, count=ly.size, offset=bo).reshape(
                    ly.shape
                ),
            )
            for ly, bo in zip(lay.layers, lay.byte_offsets, strict=True)
        ]

    def flat(self) -> np.ndarray:
        """The flat accumulator view (partial payloads)."""
        if self.header.kind != "partial" or self.header.acc is None:
            raise PackError("only partial payloads hold a flat accumulator")
        return np.frombuffer(self.data, dtype=self.header.acc, count=self.header.layout.total)


def parse(buf: Any) -> Payload:
    """Parse a payload without copying its data. Raises PackError naming the bad field."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise PackError(f"payload: expected a buffer, got {type(buf).__name__}") from None
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if len(mv) < PREFIX.size:
        raise PackError(f"payload: {len(mv)} bytes is too short for an FL payload")
    magic, version, _r, hlen, doff = PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PackError(
            f"payload: not a Hearth FL payload (magic {bytes(magic)!r}, expected {MAGIC!r})"
        )
    if version != VERSION:
        raise PackError(f"payload: unsupported version {version} (expected {VERSION})")
    if PREFIX.size + hlen > doff or doff > len(mv):
        raise PackError(
            f"payload: header length {hlen} / data offset {doff} inconsistent with {len(mv)} bytes"
        )
    try:
        raw = msgpack.unpackb(mv[PREFIX.size : PREFIX.size + hlen], raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise PackError(f"payload: header is not valid msgpack ({e})") from None
    if not isinstance(raw, dict):
        raise PackError("payload: header must be a map")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise PackError(f"header.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    n = raw.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PackError(f"header.n: expected a non-negative integer sample count, got {n!r}")
    if kind != "partial" and n == 0:
        raise PackError("header.n: sample count must be positive")
    rnd = raw.get("round")
    if rnd is not None and (not isinstance(rnd, int) or isinstance(rnd, bool)):
        raise PackError(f"header.round: expected an integer, got {rnd!r}")
    client = raw.get("client")
    if client is not None and not isinstance(client, str):
        raise PackError(f"header.client: expected a string, got {client!r}")
    layout = Layout.from_wire(raw.get("layers"))
    acc = None
    if kind == "partial":
        try:
            acc = np.dtype(raw.get("acc"))
        except TypeError:
            raise PackError(f"header.acc: unknown accumulator dtype {raw.get('acc')!r}") from None
        if acc not in (np.float32, np.float64):
            raise PackError(f"header.acc: accumulator dtype must be float32 or float64, got {acc}")
    h = Header(kind, n, layout, rnd, client, acc)
    need = h.data_nbytes
    if len(mv) - doff < need:
        raise PackError(
            f"payload: data region holds {len(mv) - doff} bytes, the layers need {need}"
        )
    return Payload(h, mv[doff : doff + need])
