"""Typed, streaming readers for the public serverless traces (and Hearth's exports of them).

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
from dataclasses import dataclass, field
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


@dataclass
class IdentityReport:
    """How well total = podAllocation + deployCode + deployDependency + scheduling holds."""

    rows: int
    violations: int
    max_abs_error: float
    tolerance: float
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "violations": self.violations,
            "max_abs_error": self.max_abs_error,
            "tolerance": self.tolerance,
            "examples": self.examples,
        }


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


# --------------------------------------------------------------------------------------------
# per-kind readers with the derived columns the analyses need

POOL_RE = r"^([^-]+-[^-]+-[^-]+)-"


def with_pool_and_funcid(lf: pl.LazyFrame | pl.DataFrame, names: list[str]):
    """poolName from podID (``pool22-300-128-0001562370`` -> ``pool22-300-128``) and
    funcID = funcName---userID---poolName, as the Huawei notebook derives them."""
    exprs = []
    if "poolName" not in names:
        exprs.append(
            pl.coalesce(pl.col("podID").str.extract(POOL_RE, 1), pl.lit("unknown")).alias(
                "poolName"
            )
        )
    if "funcID" not in names:
        exprs.append(
            pl.concat_str(
                [pl.col("funcName"), pl.col("userID"), pl.col("poolName")], separator="---"
            ).alias("funcID")
        )
    if not exprs:
        return lf
    if len(exprs) == 2:
        return lf.with_columns(exprs[0]).with_columns(exprs[1])
    return lf.with_columns(exprs)


def read_coldstarts(paths, exclude: Iterable[str] = ()) -> pl.DataFrame:
    """The cold-start table with poolName, funcID and region. ``exclude`` may name text
    columns the caller does not need (e.g. ``requestID``, 48 hex characters per row, a third
    of the bytes): they are not built. Numeric columns are always parsed, so that every bad
    value is still reported."""
    files = _as_files(paths, "huawei-coldstart")
    dtypes = {c: t for f in files for c, t in f.schema.dtypes_for(f.header).items()}
    typed = [c for c in exclude if c in dtypes and dtypes[c] != pl.String]
    if typed:
        raise ValueError(f"only text columns can be left out, not {typed}")
    names = sorted(
        {c for f in files for c in f.header}
        | ({"region"} if any(f.region for f in files) else set())
    )

    def post(lf: pl.LazyFrame) -> pl.LazyFrame:
        lf = with_pool_and_funcid(lf, names)
        if "region" not in names:
            return lf.with_columns(pl.lit("all").alias("region"))
        return lf.with_columns(pl.col("region").fill_null("all"))

    return load(files, post=post, exclude=[c for c in exclude if c in dtypes])


def read_requests(paths) -> pl.DataFrame:
    files = _as_files(paths, "huawei-request")
    names = sorted({c for f in files for c in f.header})
    return load(files, post=lambda lf: with_pool_and_funcid(lf, names))


def parse_trigger_expr(col: str = "triggerType-invocationType") -> pl.Expr:
    """``'APIG-S TIMER-A'`` -> [{trigger: APIG, mode: sync}, {trigger: TIMER, mode: async}]."""
    mode = (
        pl.element()
        .str.extract(r"-([^-]*)$", 1)
        .replace_strict({"S": "sync", "A": "async"}, default="unknown", return_dtype=pl.String)
    )
    trig = pl.coalesce(pl.element().str.extract(r"^(.*)-[^-]*$", 1), pl.element())
    return (
        pl.col(col)
        .str.strip_chars()
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
        .list.eval(pl.struct(trig.alias("trigger"), mode.alias("mode")))
        .alias("triggers")
    )


def parse_triggers(values: Sequence[str]) -> list[list[tuple[str, str]]]:
    """Pure helper: parse trigger strings into (trigger, sync|async|unknown) lists."""
    df = pl.DataFrame({"triggerType-invocationType": list(values)}).select(parse_trigger_expr())
    return [[(d["trigger"], d["mode"]) for d in row] for row in df["triggers"].to_list()]


def read_runtime(paths) -> pl.DataFrame:
    """Runtime/trigger table with funcName, userID, poolName, pool cpu/memory and parsed triggers."""
    df = load(_as_files(paths, "huawei-runtime"))
    parts = pl.col("funcID").str.split("---")
    pool = parts.list.get(2, null_on_oob=True)
    df = df.with_columns(
        parts.list.get(0, null_on_oob=True).alias("funcName"),
        parts.list.get(1, null_on_oob=True).alias("userID"),
        pool.alias("poolName"),
        pool.str.extract(r"^[^-]+-(\d+)-\d+", 1).cast(pl.Float64, strict=False).alias("pool_cpu"),
        pool.str.extract(r"^[^-]+-\d+-(\d+)", 1)
        .cast(pl.Float64, strict=False)
        .alias("pool_memory_mb"),
        parse_trigger_expr(),
    )
    bad = df.filter(pl.col("poolName").is_null()).head(1)
    if bad.height:
        raise TraceFormatError(
            files_label(paths),
            f"funcID {bad['funcID'][0]!r} is not funcName---userID---poolName",
            column="1 'funcID'",
        )
    return df.with_columns(
        pl.col("triggers").list.first().struct.field("trigger").alias("trigger"),
        pl.col("triggers").list.first().struct.field("mode").alias("invocation"),
        pl.col("triggers").list.len().alias("n_triggers"),
    )


def files_label(paths) -> str:
    if isinstance(paths, (str, Path)):
        return str(paths)
    return ", ".join(str(getattr(p, "path", p)) for p in paths)


def read_wide(paths, long: bool = False, value_name: str = "value") -> pl.DataFrame:
    """Huawei wide per-minute/per-second tables; ``long`` melts to (day, time, function, value)
    dropping empty cells."""
    files = _as_files(paths, "huawei-wide")
    df = load(files)
    if not long:
        return df
    return (
        df.unpivot(index=["day", "time"], variable_name="function", value_name=value_name)
        .filter(pl.col(value_name).is_not_null())
        .sort(["time", "function"])
    )


def read_azure2019_invocations(paths, long: bool = False) -> pl.DataFrame:
    """Azure 2019 per-minute counts. Files are days in path order: ``day`` = file index
    (d01 -> 0). ``long`` gives (function, day, minute, count) for non-zero minutes."""
    files = _as_files(paths, "azure2019-invocations")
    frames = []
    for i, f in enumerate(files):
        frames.append(load([f]).with_columns(pl.lit(i, dtype=pl.Int64).alias("day")))
    df = pl.concat(frames, how="vertical_relaxed")
    if not long:
        return df
    keys = ["HashOwner", "HashApp", "HashFunction", "Trigger", "day"]
    return (
        df.unpivot(index=keys, variable_name="minute", value_name="count")
        .filter(pl.col("count") > 0)
        .with_columns((pl.col("minute").cast(pl.Int64) - 1).alias("minute"))
        .with_columns((pl.col("day") * 1440 + pl.col("minute")).alias("abs_minute"))
    )


def read_azure2021(paths) -> pl.DataFrame:
    df = load(_as_files(paths, "azure2021"))
    return df.with_columns((pl.col("end_timestamp") - pl.col("duration")).alias("start_timestamp"))


def check_identity(
    df: pl.DataFrame, abs_tol: float = 1.5e-3, rel_tol: float = 1e-6, examples: int = 5
) -> IdentityReport:
    """Check total = sum of the four components per row. Published values are rounded (costs to
    6, deploy costs to 3 decimals), hence the absolute tolerance."""
    comp = sum(pl.col(c) for c in S.COMPONENTS)
    err = (pl.col(S.TOTAL) - comp).abs()
    tol = abs_tol + rel_tol * pl.col(S.TOTAL).abs()
    # only the five numeric columns: the string columns are never copied
    d = df.select(S.TOTAL, *S.COMPONENTS).with_columns(
        err.alias("_err"), (err > tol).fill_null(False).alias("_bad")
    )
    n_bad = int(d["_bad"].sum())
    ex: list[dict] = []
    if n_bad:
        bad = d.with_row_index("row").filter(pl.col("_bad")).head(examples)
        ex = bad.select(["row", S.TOTAL, *S.COMPONENTS, "_err"]).to_dicts()
    return IdentityReport(
        rows=df.height,
        violations=n_bad,
        max_abs_error=float(d["_err"].max() or 0.0),
        tolerance=abs_tol,
        examples=ex,
    )


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
