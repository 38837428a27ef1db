"""Index file format (version 3): one file, memory-mappable.

Version 3 adds the quantizer kind ("osq" or "rabitq") and the RaBitQ arrays (shared rotation,
row-major 1-bit codes, per-row factors); an OSQ index leaves those empty and a RaBitQ index
leaves the OSQ arrays empty. Version 2 (OSQ only) replaced version 1; a file of an older version
is refused with a message asking for a rebuild.

    bytes 0..8    magic b"HEARTHVX"
    bytes 8..12   u32 format version
    bytes 12..16  u32 header length H
    bytes 16..20  u32 crc32 of the header
    bytes 20..20+H  header (UTF-8 JSON): dims, metric, bits_per_dim, counts, attributes,
                    and an array table {name: {offset, dtype, shape, crc32}}
    then each array at a 64-byte aligned offset.

The quantized arrays are read into memory; the raw vectors, raw attributes and ids are
memory-mapped (only the rows being re-ranked are touched). Every problem (wrong magic, unknown
version, truncation, checksum mismatch, inconsistent shapes) raises IndexFormatError naming it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from . import quantize, rabitq
from .attributes import AttributeSpec
from .index import METRICS, VecIndex

MAGIC = b"HEARTHVX"
FORMAT_VERSION = 3
QUANTIZERS = ("osq", "rabitq")
_PRE = struct.Struct("<8sIII")
ALIGN = 64
MAPPED = ("raw", "attrs", "ids")
ARRAYS = (
    "centroids",
    "list_centroids",
    "list_part",
    "list_rc",
    "rot",
    "means",
    "bits",
    "bitoff",
    "bnd_off",
    "bnd",
    "range_ptr",
    "ranges",
    "codes",
    "signs",
    "acodes",
    "alive",
    "hist",
    "rq_flip",
    "rq_perm",
    "rq_codes",
    "rq_fac",
    "raw",
    "attrs",
    "ids",
)


class IndexFormatError(ValueError):
    """The file is not a readable index of this format; the message says what is wrong."""


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(_bytes(a)) & 0xFFFFFFFF


def _bytes(a: np.ndarray) -> memoryview:
    """The array's bytes without a copy (also for empty arrays of any shape)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def save(index: VecIndex, path: str | os.PathLike) -> int:
    """Write atomically (temp file + rename). Returns the file size."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        name: np.ascontiguousarray(getattr(index, name)) for name in ARRAYS
    }
    extra: dict[str, Any] = {}
    if index.labels is not None:
        blob = "\n".join(index.labels).encode()
        arrays["labels"] = np.frombuffer(blob, dtype=np.uint8)
        extra["labels"] = True
    table: dict[str, dict[str, Any]] = {}
    header: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "dims": index.dims,
        "metric": index.metric,
        "bits_per_dim": index.bits_per_dim,
        "quantizer": index.quantizer,
        "nseg": index.nseg,
        "sign_dims": index.sign_dims,
        "n_rows": index.n_rows,
        "n_live": index.n_live,
        "n_partitions": index.n_partitions,
        "n_lists": index.n_lists,
        "attributes": [a.to_json() for a in index.attributes],
        "build_info": index.build_info,
        **extra,
    }
    # two passes: offsets depend on the header length, which depends on the offsets' digits
    hlen_guess = 0
    for _ in range(3):
        off = _align(_PRE.size + hlen_guess)
        for name, a in arrays.items():
            table[name] = {
                "offset": off,
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "crc32": _crc(a),
            }
            off = _align(off + a.nbytes)
        header["arrays"] = table
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        if len(hbytes) <= hlen_guess:
            break
        hlen_guess = len(hbytes) + 256
    hbytes = hbytes.ljust(hlen_guess, b" ")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_PRE.pack(MAGIC, FORMAT_VERSION, len(hbytes), zlib.crc32(hbytes) & 0xFFFFFFFF))
        f.write(hbytes)
        for name, a in arrays.items():
            f.seek(table[name]["offset"])
            f.write(_bytes(a))
        f.truncate(off)
    os.replace(tmp, path)
    return off


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise IndexFormatError(f"{path}: no such index file")
    if path.is_dir():
        raise IndexFormatError(f"{path}: is a directory, not an index file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        pre = f.read(_PRE.size)
        if len(pre) < _PRE.size:
            raise IndexFormatError(
                f"{path}: file too short ({size} bytes) to be a Hearth vector index"
            )
        magic, version, hlen, hcrc = _PRE.unpack(pre)
        if magic != MAGIC:
            raise IndexFormatError(
                f"{path}: not a Hearth vector index (bad magic {magic!r}, expected {MAGIC!r})"
            )
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: unsupported index format version {version} (this build reads version {FORMAT_VERSION}); rebuild the index"
            )
        hbytes = f.read(hlen)
    if len(hbytes) < hlen:
        raise IndexFormatError(f"{path}: truncated header ({len(hbytes)} of {hlen} bytes)")
    if zlib.crc32(hbytes) & 0xFFFFFFFF != hcrc:
        raise IndexFormatError(f"{path}: header checksum mismatch (file corrupted)")
    try:
        header = json.loads(hbytes)
    except ValueError as e:
        raise IndexFormatError(f"{path}: header is not valid JSON ({e})") from e
    header["_size"] = size
    return header


def load(path: str | os.PathLike, verify: bool = True, mmap: bool = True) -> VecIndex:
    """Open an index. `verify` checks every array's crc32 (raw data included)."""
    path = Path(path)
    h = read_header(path)
    size = h.pop("_size")
    _check_header(path, h)
    kind = h["quantizer"]
    arrays = _read_arrays(path, h["arrays"], size, verify, mmap)
    _check_arrays(path, h, arrays)
    d, n = h["dims"], h["n_rows"]
    labels = None
    if h.get("labels") and "labels" in arrays:
        labels = bytes(arrays.pop("labels")).decode().split("\n")
        if len(labels) != n:
            raise IndexFormatError(f"{path}: {len(labels)} labels for {n} rows")
    arrays.pop("labels", None)
    return VecIndex(
        dims=d,
        metric=h["metric"],
        bits_per_dim=float(h["bits_per_dim"]),
        nseg=int(h["nseg"]),
        sign_dims=int(h["sign_dims"]),
        attributes=[AttributeSpec.from_json(a) for a in h.get("attributes", [])],
        labels=labels,
        build_info=h.get("build_info", {}),
        quantizer=kind,
        **arrays,
    )


def _check_header(path: Path, h: dict) -> None:
    """The header names every field, a known metric and quantizer, and every array."""
    for key in (
        "dims",
        "metric",
        "bits_per_dim",
        "nseg",
        "sign_dims",
        "n_rows",
        "n_partitions",
        "n_lists",
        "quantizer",
        "arrays",
    ):
        if key not in h:
            raise IndexFormatError(f"{path}: header lacks '{key}'")
    if h["metric"] not in METRICS:
        raise IndexFormatError(
            f"{path}: unknown metric '{h['metric']}' (expected one of {METRICS})"
        )
    kind = h["quantizer"]
    if kind not in QUANTIZERS:
        raise IndexFormatError(f"{path}: unknown quantizer '{kind}' (expected one of {QUANTIZERS})")
    missing = [n for n in ARRAYS if n not in h["arrays"]]
    if missing:
        raise IndexFormatError(f"{path}: header lacks arrays {missing}")


def _read_arrays(
    path: Path, table: dict, size: int, verify: bool, mmap: bool
) -> dict[str, np.ndarray]:
    """Each array of the header's table: a view of the mapped file (kept mapped for the
    ``MAPPED`` ones when ``mmap``, else copied), its crc32 checked when ``verify``."""
    arrays: dict[str, np.ndarray] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None
    for name, meta in table.items():
        dt = np.dtype(meta["dtype"])
        shape = tuple(meta["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        off = int(meta["offset"])
        if off + nbytes > size:
            raise IndexFormatError(
                f"{path}: truncated: array '{name}' needs bytes {off}..{off + nbytes} but the file has {size}"
            )
        view = np.ndarray(shape, dtype=dt, buffer=mm, offset=off) if nbytes else np.zeros(shape, dt)
        if verify and _crc(view) != meta["crc32"]:
            raise IndexFormatError(f"{path}: checksum mismatch in array '{name}' (file corrupted)")
        arrays[name] = view if (mmap and name in MAPPED) else np.array(view)
    return arrays


def _check_arrays(path: Path, h: dict, arrays: dict[str, np.ndarray]) -> None:
    """Shapes and dtypes as the header implies; RaBitQ permutations; OSQ byte packing."""
    kind = h["quantizer"]
    d, n, p = h["dims"], h["n_rows"], h["n_partitions"]
    nl = int(h.get("n_lists", 0))
    expect = {
        "raw": (n, d),
        "ids": (n,),
        "centroids": (p, d),
        "range_ptr": (nl + 1,),
        "list_centroids": (nl, d),
        "list_part": (nl,),
    }
    if kind == "osq":
        expect.update(
            codes=(h["nseg"] + 1, n), signs=(n,), rot=(p, d, d), means=(p, d), bits=(p, d),
            list_rc=(nl, d), rq_codes=(0, 0), rq_fac=(0, 4),
        )  # fmt: skip
    else:
        D = rabitq.padded_dims(d)
        expect.update(
            rq_flip=(rabitq.ROUNDS, D), rq_perm=(rabitq.ROUNDS, D), rq_codes=(n, D // 8),
            rq_fac=(n, 4), codes=(1, 0), signs=(0,),
        )  # fmt: skip
    dtypes = (
        ("signs", np.uint32), ("list_centroids", np.float16), ("rq_codes", np.uint8),
        ("rq_fac", np.float32), ("rq_flip", np.float32), ("rq_perm", np.int32),
    )  # fmt: skip
    for name, dt in dtypes:
        if arrays[name].dtype != dt:
            raise IndexFormatError(
                f"{path}: array '{name}' has dtype {arrays[name].dtype}, expected {np.dtype(dt)}"
            )
    for name, shape in expect.items():
        if tuple(arrays[name].shape) != shape:
            raise IndexFormatError(
                f"{path}: array '{name}' has shape {tuple(arrays[name].shape)} but the header (dims={d}, rows={n}, partitions={p}, lists={nl}) implies {shape}"
            )
    if kind == "rabitq":
        perm = arrays["rq_perm"]
        if not all(np.array_equal(np.sort(r), np.arange(perm.shape[1])) for r in perm):
            raise IndexFormatError(f"{path}: rq_perm is not a permutation (file corrupted)")
    for part in range(p if kind == "osq" else 0):
        why = quantize.check_byte_packing(arrays["bits"][part], arrays["bitoff"][part], h["nseg"])
        if why:
            raise IndexFormatError(f"{path}: partition {part}: {why}")
