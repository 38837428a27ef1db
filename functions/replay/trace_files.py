"""Typed, streaming reading of trace files: finding them, checking each header against the
known schemas, a lazy typed scan, one collect, and naming the first bad value.

Everything goes through polars: a header check per file (one line read), a lazy typed scan per
file, and one collect. Only when a collect fails do we re-read that file as text to name the
exact file, line and column of the first bad value -- the fast path never touches Python rows.

Accepted inputs: a file (``.csv``, ``.csv.gz``/``.gz``, ``.parquet``) or a directory (searched
recursively, files sorted by path: "a directory of daily files").
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import csv
import io
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from . import schemas as S
from .schemas import TraceSchema

SUFFIXES = (".csv", ".csv.gz", ".gz", ".parquet", ".pq")
NULLS: list[str] | None = None  # empty fields are null; NaN/nan parse as float NaN


class TraceFormatError(ValueError):
    """A trace file does not match its schema. Names the file, line (1-based) and column."""

    def __init__(
        self, path: str | Path, reason: str, line: int | None = None, column: str | None = None
    ):
        self.path = str(path)
        self.line = line
        self.column = column
        self.reason = reason
        where = self.path
        if line is not None:
            where += f": line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {reason}")


@dataclass
class TraceFile:
    path: Path
    schema: TraceSchema
    header: list[str]
    fmt: str  # "csv" | "gzip" | "parquet"
    region: str | None = None  # parent directory name when read from a directory

    @property
    def kind(self) -> str:
        return self.schema.kind


# --------------------------------------------------------------------------------------------
# files and headers


def list_files(path: str | Path) -> list[Path]:
    """The trace files under ``path`` (itself if a file), sorted; sidecars are ignored."""
    p = Path(path)
    if not p.exists():
        raise TraceFormatError(p, "no such file or directory")
    if p.is_file():
        return [p]
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and f.name.lower().endswith(SUFFIXES) and not f.name.startswith(".")
    )
    if not files:
        raise TraceFormatError(p, f"directory holds no trace files ({', '.join(SUFFIXES)})")
    return files


def _fmt(path: Path) -> str:
    n = path.name.lower()
    if n.endswith((".parquet", ".pq")):
        return "parquet"
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return "gzip"
    return "csv"


def _gunzip(path: Path) -> bytes:
    """Decompress a (multi-member) gzip file; a truncated stream names the line it stops in."""
    raw = path.read_bytes()
    out: list[bytes] = []
    data = raw
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out.append(d.decompress(data))
            out.append(d.flush())
        except zlib.error as e:
            got = b"".join(out)
            raise TraceFormatError(
                path, f"corrupt gzip stream ({e})", line=got.count(b"\n") + 1
            ) from None
        if not d.eof:
            got = b"".join(out)
            line = got.count(b"\n") + 1
            col = None
            first_nl = got.find(b"\n")
            if first_nl > 0:
                header = got[:first_nl].decode("utf-8", "replace").rstrip("\r").split(",")
                partial = got[got.rfind(b"\n") + 1 :].decode("utf-8", "replace")
                k = partial.count(",")
                if k < len(header):
                    col = f"{k + 1} {header[k]!r}"
            raise TraceFormatError(
                path,
                "truncated gzip stream: the file ends before the compressed data does "
                "(incomplete download?)",
                line=line,
                column=col,
            )
        data = d.unused_data
        if not data:
            break
    return b"".join(out)


def _first_line(path: Path, fmt: str) -> str:
    if fmt == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        with open(path, "rb") as fh:
            buf = b""
            while b"\n" not in buf:
                chunk = fh.read(65536)
                if not chunk:
                    break
                try:
                    buf += d.decompress(chunk)
                except zlib.error as e:
                    raise TraceFormatError(path, f"corrupt gzip stream ({e})", line=1) from None
        return buf.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    with open(path, "rb") as fh:
        return fh.readline(1 << 20).decode("utf-8", "replace").rstrip("\r\n")


def inspect(path: str | Path, kind: str | None = None, region: str | None = None) -> TraceFile:
    """Read one file's header, detect (or check) its kind. Raises TraceFormatError on mismatch."""
    p = Path(path)
    fmt = _fmt(p)
    if fmt == "parquet":
        try:
            header = list(pl.read_parquet_schema(p).keys())
        except Exception as e:  # noqa: BLE001 - any pyarrow/polars failure is a format error
            raise TraceFormatError(
                p, f"not a readable parquet file ({str(e).splitlines()[0]})"
            ) from None
    else:
        line = _first_line(p, fmt)
        if not line.strip():
            raise TraceFormatError(p, "empty file: no header line", line=1)
        header = next(csv.reader([line]))
    if kind is not None:
        if kind not in S.SCHEMAS:
            raise TraceFormatError(
                p, f"unknown trace kind {kind!r} (known: {', '.join(S.SCHEMAS)})"
            )
        schema = S.SCHEMAS[kind]
        bad = S.check_header(schema, header)
        if bad is not None:
            col, why = bad
            raise TraceFormatError(
                p, f"header does not match {kind}: {why}", line=1, column=str(col)
            )
    else:
        schema = S.detect(header)
        if schema is None:
            near = S.closest(header)
            col, why = S.check_header(near, header) or (1, "unrecognised")
            raise TraceFormatError(
                p,
                f"unrecognised header; closest known kind is {near.kind} ({near.description}): {why}",
                line=1,
                column=str(col),
            )
    return TraceFile(p, schema, header, fmt, region)


def inspect_all(
    paths: str | Path | Sequence[str | Path], kind: str | None = None
) -> list[TraceFile]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[TraceFile] = []
    for root in paths:
        rp = Path(root)
        for f in list_files(rp):
            region = f.parent.name if rp.is_dir() else None
            out.append(inspect(f, kind, region))
    return out


# --------------------------------------------------------------------------------------------
# scanning


def _scan_one(tf: TraceFile) -> pl.LazyFrame:
    dtypes = tf.schema.dtypes_for(tf.header)
    if tf.fmt == "parquet":
        lf = pl.scan_parquet(tf.path).with_columns([pl.col(c).cast(t) for c, t in dtypes.items()])
    else:
        src: Path | bytes = tf.path if tf.fmt == "csv" else _gunzip(tf.path)
        lf = pl.scan_csv(
            src,
            schema=dtypes,
            null_values=NULLS,
            has_header=True,
        )
    if tf.region is not None and "region" in dict(tf.schema.optional) and "region" not in tf.header:
        lf = lf.with_columns(pl.lit(tf.region, dtype=pl.String).alias("region"))
    return lf


def scan(
    paths: str | Path | Sequence[str | Path] | Sequence[TraceFile],
    kind: str | None = None,
    post=None,
) -> pl.LazyFrame:
    """A lazy, typed frame over all files (headers already checked). Bad values surface at
    collect time; use :func:`load` to get them as :class:`TraceFormatError`. ``post`` is
    applied to each file's frame (derived columns are then computed file-parallel)."""
    files = _as_files(paths, kind)
    kinds = {f.kind for f in files}
    if len(kinds) > 1:
        raise TraceFormatError(
            files[0].path, f"files of different kinds cannot be read together: {sorted(kinds)}"
        )
    frames = [_scan_one(f) for f in files]
    if post is not None:
        frames = [post(f) for f in frames]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")


def _as_files(paths, kind) -> list[TraceFile]:
    if isinstance(paths, (list, tuple)) and paths and isinstance(paths[0], TraceFile):
        return list(paths)
    return inspect_all(paths, kind)


def load(
    paths: str | Path | Sequence[str | Path] | Sequence[TraceFile],
    kind: str | None = None,
    columns: Iterable[str] | None = None,
    post=None,
    exclude: Iterable[str] = (),
) -> pl.DataFrame:
    """Collect the typed frame; on a parse failure, name the first bad file/line/column.
    ``post`` (LazyFrame -> LazyFrame) adds derived columns inside the same query plan.
    ``exclude``: columns left out of the result (polars then does not build them)."""
    files = _as_files(paths, kind)
    lf = scan(files, post=post)
    if columns is not None:
        lf = lf.select(list(columns))
    exclude = list(exclude)
    if exclude:
        lf = lf.select(pl.exclude(exclude))
    try:
        df = lf.collect()
    except TraceFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - polars raises several types; locate precisely
        for f in files:
            err = locate_error(f)
            if err is not None:
                raise err from None
        raise TraceFormatError(files[0].path, str(e).splitlines()[0]) from None
    req = [c for c in files[0].schema.required if c in df.columns]
    if any(df[c].null_count() for c in req):  # null counts are kept per chunk: no pass
        for f in files:
            err = _locate_missing(f, req)
            if err is not None:
                raise err
    return df


def _locate_missing(tf: TraceFile, req: list[str]) -> TraceFormatError | None:
    """First empty required value (short rows are reported by their field count)."""
    if tf.fmt != "parquet":
        data = tf.path.read_bytes() if tf.fmt == "csv" else _gunzip(tf.path)
        rag = _ragged(tf, data)
        if rag.line is not None:
            return rag
    df = _scan_one(tf).select(req).collect().with_row_index("_r")
    for name in req:
        nulls = df.filter(pl.col(name).is_null())
        if nulls.height:
            r = int(nulls["_r"][0])
            ci = tf.header.index(name) + 1 if name in tf.header else 0
            line = r + (2 if tf.fmt != "parquet" else 1)
            return TraceFormatError(tf.path, "missing value", line=line, column=f"{ci} {name!r}")
    return None


def locate_error(tf: TraceFile) -> TraceFormatError | None:
    """Slow path: re-read one file as text and find its first unparseable value (or ragged row)."""
    dtypes = tf.schema.dtypes_for(tf.header)
    if tf.fmt == "parquet":
        df = pl.read_parquet(tf.path)
        first_line = 0  # parquet rows are reported as "row N" (1-based), no header line
    else:
        data = tf.path.read_bytes() if tf.fmt == "csv" else _gunzip(tf.path)
        try:
            df = pl.read_csv(data, infer_schema=False, null_values=NULLS, has_header=True)
        except Exception:  # noqa: BLE001 - ragged lines etc.: find them with the csv module
            return _ragged(tf, data)
        first_line = 1
        if df.columns != tf.header:
            return TraceFormatError(tf.path, "header changed while reading", line=1)
    best: tuple[int, int, str, str] | None = None
    for ci, (name, dt) in enumerate(dtypes.items()):
        if name not in df.columns or dt == pl.String:
            continue
        s = df.get_column(name)
        if s.dtype == dt:
            continue
        cast = s.cast(dt, strict=False) if s.dtype == pl.String else s.cast(dt, strict=False)
        bad = (s.is_not_null() & cast.is_null()).arg_true()
        if len(bad):
            r = int(bad[0])
            if best is None or (r, ci) < (best[0], best[1]):
                best = (r, ci, name, str(s[r]))
    if best is None:
        return None
    r, ci, name, val = best
    what = "a number" if dtypes[name] in (pl.Float64, pl.Int64) else str(dtypes[name])
    if dtypes[name] == pl.Int64:
        what = "an integer"
    line = r + 1 + first_line
    return TraceFormatError(
        tf.path,
        f"expected {what}, got {val!r}" + ("" if first_line else " (parquet row)"),
        line=line,
        column=f"{ci + 1} {name!r}",
    )


def _ragged(tf: TraceFile, data: bytes) -> TraceFormatError:
    n = len(tf.header)
    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace")))
    for i, row in enumerate(reader, start=1):
        if len(row) != n:
            col = f"{min(len(row), n) + 1}"
            return TraceFormatError(
                tf.path, f"expected {n} fields, found {len(row)}", line=i, column=col
            )
    return TraceFormatError(tf.path, "unparseable CSV")


def files_label(paths) -> str:
    if isinstance(paths, (str, Path)):
        return str(paths)
    return ", ".join(str(getattr(p, "path", p)) for p in paths)


def classify(
    paths: Sequence[str | Path], skipped: list[str] | None = None
) -> dict[str, list[TraceFile]]:
    """Group all files under ``paths`` by detected kind (the analyser takes mixed inputs).

    A file named directly must be a known kind; inside a directory, unknown files are skipped
    and reported through ``skipped`` when it is given (otherwise they are errors)."""
    out: dict[str, list[TraceFile]] = {}
    for root in paths:
        rp = Path(root)
        for f in list_files(rp):
            region = f.parent.name if rp.is_dir() else None
            try:
                tf = inspect(f, None, region)
            except TraceFormatError as e:
                if skipped is None or not rp.is_dir():
                    raise
                skipped.append(str(e))
                continue
            out.setdefault(tf.kind, []).append(tf)
    return out
