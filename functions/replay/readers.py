"""Readers for the public serverless traces (and Hearth's exports of them), one per kind, each
adding the derived columns the analyses need; and the cold-start total identity check.

The typed reading itself (files, headers, scan, load, error location) is in ``trace_files``;
its names are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import polars as pl

from . import schemas as S
from .trace_files import (
    NULLS,
    SUFFIXES,
    TraceFile,
    TraceFormatError,
    _as_files,
    classify,
    files_label,
    inspect,
    inspect_all,
    list_files,
    load,
    locate_error,
    scan,
)

__all__ = [
    "NULLS",
    "POOL_RE",
    "SUFFIXES",
    "IdentityReport",
    "TraceFile",
    "TraceFormatError",
    "check_identity",
    "classify",
    "files_label",
    "inspect",
    "inspect_all",
    "list_files",
    "load",
    "locate_error",
    "parse_trigger_expr",
    "parse_triggers",
    "read_azure2019_invocations",
    "read_azure2021",
    "read_coldstarts",
    "read_requests",
    "read_runtime",
    "read_wide",
    "scan",
    "with_pool_and_funcid",
]


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
