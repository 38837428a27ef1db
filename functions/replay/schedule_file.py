"""A schedule's file (what `schedule.Schedule.write` wrote, or `--schedule-out`): reading it back
typed, each bad or missing value named by line and column, and telling a schedule from a trace."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from . import readers as R

COLUMNS = ["seq", "t", "function", "duration_ms", "memory_mb", "phase", "trace_t"]


def read_frame(path: str | Path) -> tuple[pl.DataFrame, dict]:
    """The schedule's table, typed, and its meta (parquet metadata or the ``.meta.json`` beside
    a CSV); `TraceFormatError` naming the file, and the line and column of a bad value."""
    p = Path(path)
    parquet = p.name.endswith((".parquet", ".pq"))
    try:
        if parquet:
            import pyarrow.parquet as pq

            kv = pq.ParquetFile(p).metadata.metadata or {}
            meta = json.loads(kv.get(b"hearth.schedule", b"{}"))
            df = pl.read_parquet(p)
        else:
            side = p.with_name(p.name + ".meta.json")
            meta = json.loads(side.read_text()) if side.exists() else {}
            df = pl.read_csv(p, infer_schema=False)  # typed below, naming a bad value
    except (ValueError, pl.exceptions.PolarsError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise R.TraceFormatError(p, f"not a readable schedule: {reason}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise R.TraceFormatError(p, f"not a schedule: missing columns {missing}", line=1)
    return _typed(df.select(COLUMNS), p, first_line=1 if parquet else 2), meta


_TYPES = {"seq": pl.Int64, "t": pl.Float64, "duration_ms": pl.Float64, "memory_mb": pl.Float64}
_TYPES |= {"trace_t": pl.Float64, "function": pl.String, "phase": pl.String}


def _typed(df: pl.DataFrame, p: Path, first_line: int) -> pl.DataFrame:
    """`df` with the schedule's column types; the first missing or unparseable value (by row,
    then column) is an error naming its line (parquet: its 1-based row)."""
    bad: tuple[int, int, str] | None = None
    for ci, name in enumerate(COLUMNS):
        col, want = df.get_column(name), _TYPES[name]
        cast = col.cast(want, strict=False)
        unparsed = col.is_not_null() & cast.is_null()
        rows = unparsed if name == "trace_t" else unparsed | col.is_null()  # warm-up: no trace_t
        if rows.any():
            r = int(rows.arg_true()[0])
            if bad is None or (r, ci) < bad[:2]:
                v = col[r]
                bad = (r, ci, "missing value" if v is None else f"expected a number, got {v!r}")
        df = df.with_columns(cast)
    if bad is not None:
        r, ci, reason = bad
        raise R.TraceFormatError(p, reason, line=r + first_line, column=f"{ci + 1} {COLUMNS[ci]!r}")
    return df


def is_schedule(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    try:
        tf_header = R.inspect(p).header
    except R.TraceFormatError:
        # not a trace: a schedule? A file that is neither (binary, not parquet) is not one: the
        # trace reader then names what is wrong with it
        try:
            if p.name.endswith((".parquet", ".pq")):
                header = list(pl.read_parquet_schema(p))
            else:
                with open(p, encoding="utf-8") as fh:
                    header = fh.readline().strip().split(",")
        except (OSError, ValueError, pl.exceptions.PolarsError):
            return False
        return set(COLUMNS) <= set(header)
    return set(COLUMNS) <= set(tf_header)
