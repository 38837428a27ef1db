"""Column layouts of the public serverless traces (and Hearth's own exports, which reuse them).

One :class:`TraceSchema` per file kind. Readers detect the kind from the header, check it, and
parse with these dtypes; analysis, scheduling and synthesis all refer to the same column names.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

from dataclasses import dataclass

import polars as pl

F64 = pl.Float64
I64 = pl.Int64
STR = pl.String


@dataclass(frozen=True)
class TraceSchema:
    """A file layout: required leading columns (in order), optional trailing ones, dtypes.

    ``wide`` layouts have a fixed prefix followed by any number of value columns (one per
    function or per minute) that all share ``value_dtype``.
    """

    kind: str
    description: str
    columns: tuple[tuple[str, pl.DataType], ...]
    optional: tuple[tuple[str, pl.DataType], ...] = ()
    wide: bool = False
    value_dtype: pl.DataType = F64
    expected_value_columns: tuple[str, ...] | None = None  # wide layouts with fixed names
    order_strict: bool = True
    required: tuple[str, ...] = ()  # columns that may never be empty

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def dtypes_for(self, header: list[str]) -> dict[str, pl.DataType]:
        """Polars schema for a file with this header (already validated)."""
        known = dict(self.columns) | dict(self.optional)
        out: dict[str, pl.DataType] = {}
        for name in header:
            if name in known:
                out[name] = known[name]
            elif self.wide:
                out[name] = self.value_dtype
            else:  # unknown extra column: keep as text
                out[name] = STR
        return out


COMPONENTS = ("podAllocationCost", "deployCodeCost", "deployDependencyCost", "schedulingCost")
TOTAL = "totalCost_cold_start"

HUAWEI_COLDSTART = TraceSchema(
    kind="huawei-coldstart",
    description="Huawei 2025 cold-start table (one row per cold start; costs in seconds)",
    columns=(
        ("day", I64),
        ("time", F64),
        ("clusterName", STR),
        ("funcName", STR),
        ("userID", STR),
        ("requestID", STR),
        (TOTAL, F64),
        ("podAllocationCost", F64),
        ("deployCodeCost", F64),
        ("deployDependencyCost", F64),
        ("schedulingCost", F64),
        ("podID", STR),
    ),
    optional=(("region", STR), ("poolName", STR), ("funcID", STR)),
    required=("day", "time", "funcName", TOTAL, *COMPONENTS, "podID"),
)

HUAWEI_REQUEST = TraceSchema(
    kind="huawei-request",
    required=("time_worker", "funcName", "podID"),
    description="Huawei 2025 per-request table (one row per request; costs in seconds)",
    columns=(
        ("time_worker", F64),
        ("time_frontend", F64),
        ("requestID", STR),
        ("clusterName", STR),
        ("funcName", STR),
        ("podID", STR),
        ("userID", STR),
        ("totalCost_worker", F64),
        ("workerCost", F64),
        ("runtimeCost", F64),
        ("totalCost_frontend", F64),
        ("frontendCost", F64),
        ("busCost", F64),
        ("readBodyCost", F64),
        ("writeRspCost", F64),
        ("cpu_usage", F64),
        ("memory_usage", F64),
        ("requestBodySize", F64),
    ),
    # Hearth's replay driver appends these to the per-request columns.
    optional=(
        ("planned_s", F64),
        ("sent_s", F64),
        ("lag_s", F64),
        ("status", I64),
        ("cold", pl.Boolean),
        ("instance", STR),
        ("invocation", STR),
        ("phase", STR),
        ("trace_function", STR),
        ("error", STR),
        ("region", STR),
    ),
)

HUAWEI_RUNTIME = TraceSchema(
    kind="huawei-runtime",
    description="Huawei 2025 funcID -> cpu request, runtime, trigger/invocation type",
    columns=(
        ("funcID", STR),
        ("cpu_request", F64),
        ("runtime", STR),
        ("triggerType-invocationType", STR),
    ),
    required=("funcID", "triggerType-invocationType"),
)

HUAWEI_WIDE = TraceSchema(
    kind="huawei-wide",
    description="Huawei 2023/2025 wide table: day,time then one column per function "
    "(requests/cpu/instances per minute or per second)",
    columns=(("day", I64), ("time", F64)),
    wide=True,
    value_dtype=F64,
)

AZURE2019_INVOCATIONS = TraceSchema(
    kind="azure2019-invocations",
    description="Azure Functions 2019 invocations per function per minute (one day per file)",
    columns=(("HashOwner", STR), ("HashApp", STR), ("HashFunction", STR), ("Trigger", STR)),
    wide=True,
    value_dtype=I64,
    expected_value_columns=tuple(str(i) for i in range(1, 1441)),
)

_PCT_D = ("0", "1", "25", "50", "75", "99", "100")
AZURE2019_DURATIONS = TraceSchema(
    kind="azure2019-durations",
    description="Azure Functions 2019 per-function execution-time percentiles (ms, per day)",
    columns=(
        ("HashOwner", STR),
        ("HashApp", STR),
        ("HashFunction", STR),
        ("Average", F64),
        ("Count", F64),
        ("Minimum", F64),
        ("Maximum", F64),
        *((f"percentile_Average_{p}", F64) for p in _PCT_D),
    ),
)
DURATION_PERCENTILES = tuple((float(p), f"percentile_Average_{p}") for p in _PCT_D)

_PCT_M = ("1", "5", "25", "50", "75", "95", "99", "100")
AZURE2019_MEMORY = TraceSchema(
    kind="azure2019-memory",
    description="Azure Functions 2019 per-application allocated-memory percentiles (MB, per day)",
    columns=(
        ("HashOwner", STR),
        ("HashApp", STR),
        ("SampleCount", F64),
        ("AverageAllocatedMb", F64),
        *((f"AverageAllocatedMb_pct{p}", F64) for p in _PCT_M),
    ),
)
MEMORY_PERCENTILES = tuple((float(p), f"AverageAllocatedMb_pct{p}") for p in _PCT_M)

AZURE2021 = TraceSchema(
    kind="azure2021",
    description="Azure Functions 2021 per-invocation trace (end timestamp and duration, seconds)",
    columns=(("app", STR), ("func", STR), ("end_timestamp", F64), ("duration", F64)),
    required=("app", "func", "end_timestamp", "duration"),
)

SCHEMAS: dict[str, TraceSchema] = {
    s.kind: s
    for s in (
        HUAWEI_COLDSTART,
        HUAWEI_REQUEST,
        HUAWEI_RUNTIME,
        HUAWEI_WIDE,
        AZURE2019_INVOCATIONS,
        AZURE2019_DURATIONS,
        AZURE2019_MEMORY,
        AZURE2021,
    )
}

NUMERIC_TYPES = (pl.Float64, pl.Int64)


def check_header(schema: TraceSchema, header: list[str]) -> tuple[int, str] | None:
    """None if the header fits ``schema``; else (1-based column index, reason)."""
    req = schema.names
    if len(header) < len(req):
        missing = [c for c in req if c not in header]
        if missing:
            idx = len(header) + 1
            for i, name in enumerate(req):
                if i >= len(header) or header[i] != name:
                    idx = i + 1
                    break
            return idx, f"missing column {missing[0]!r} (expected {len(req)} leading columns {req})"
    for i, name in enumerate(req):
        if header[i] != name:
            return i + 1, f"expected column {name!r}, found {header[i]!r}"
    rest = header[len(req) :]
    if schema.expected_value_columns is not None:
        exp = list(schema.expected_value_columns)
        for j, (got, want) in enumerate(zip(rest, exp, strict=False)):
            if got != want:
                return len(req) + j + 1, f"expected column {want!r}, found {got!r}"
        if len(rest) != len(exp):
            return len(header), f"expected {len(exp)} minute columns, found {len(rest)}"
    elif not schema.wide:
        opt = {c for c, _ in schema.optional}
        seen = set()
        for j, name in enumerate(rest):
            if name in seen or name in req:
                return len(req) + j + 1, f"duplicate column {name!r}"
            seen.add(name)
            _ = opt  # unknown extras are allowed and kept as text
    else:
        if len(rest) == 0:
            return len(header) + 1, "a wide table needs at least one value column"
        if len(set(rest)) != len(rest):
            return len(header), "duplicate value columns"
    return None


def detect(header: list[str]) -> TraceSchema | None:
    """The schema whose required columns lead the header (most specific first)."""
    order = (
        HUAWEI_COLDSTART,
        HUAWEI_REQUEST,
        HUAWEI_RUNTIME,
        AZURE2019_INVOCATIONS,
        AZURE2019_DURATIONS,
        AZURE2019_MEMORY,
        AZURE2021,
    )
    for s in order:
        if check_header(s, header) is None:
            return s
    # A mis-spelled narrow table must not pass as a wide one.
    narrow_names = {"funcName", "podID", "requestID", "clusterName", "userID", "funcID"}
    if check_header(HUAWEI_WIDE, header) is None and not narrow_names & set(header):
        return HUAWEI_WIDE
    return None


def closest(header: list[str]) -> TraceSchema:
    """The schema sharing most column names with ``header`` (for error messages)."""
    hs = set(header)

    def score(s: TraceSchema) -> float:
        names = set(s.names)
        return len(names & hs) / len(names | hs) if not s.wide else len(names & hs) / len(names)

    return max(SCHEMAS.values(), key=score)
