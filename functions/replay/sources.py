"""Where a schedule's arrivals come from: whatever a set of trace files holds, as a Source
(exact arrival times, or per-bin counts to spread), plus per-function durations and memory.
Reads the files (the first applicable kind wins); ``schedule.build`` takes it from there."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from . import readers as R
from . import schemas as S
from .trace_files import TraceFile


@dataclass
class Source:
    """What a trace gives us: exact arrivals or binned counts, plus per-function resources."""

    exact: pl.DataFrame | None = None  # function, t, [duration_ms], [memory_mb]
    counts: pl.DataFrame | None = None  # function, t0, width, count
    durations: pl.DataFrame | None = None  # function, q (0..100), value_ms
    memory: pl.DataFrame | None = None  # function, q, value_mb
    kind: str = ""


def load_source(paths: list[str | Path]) -> Source:
    """Read whatever arrival information the files hold (first applicable kind wins); files
    that hold no arrival at all (a header only) are an error naming them: a schedule starts at
    the trace's first arrival."""
    skipped: list[str] = []
    kinds = R.classify(paths, skipped=skipped)
    src = _read_source(paths, kinds)
    rows = src.exact if src.exact is not None else src.counts
    if rows is not None and rows.height == 0:
        files = [f.path for f in kinds.get(src.kind, [])] or paths
        names = ", ".join(map(str, files))
        raise R.TraceFormatError(names, "no invocations (the file holds a header only)", line=2)
    return src


def _read_source(paths: list[str | Path], kinds: dict[str, list[TraceFile]]) -> Source:
    if "azure2021" in kinds:
        df = R.read_azure2021(kinds["azure2021"])
        return Source(
            exact=df.select(
                pl.col("func").alias("function"),
                pl.col("start_timestamp").alias("t"),
                (pl.col("duration") * 1000).alias("duration_ms"),
            ),
            kind="azure2021",
        )
    if "huawei-request" in kinds:
        df = R.read_requests(kinds["huawei-request"])
        return Source(
            exact=df.select(
                pl.col("funcID").alias("function"),
                pl.col("time_worker").alias("t"),
                (pl.col("runtimeCost") * 1000).alias("duration_ms"),
                pl.col("memory_usage").alias("memory_mb"),
            ),
            kind="huawei-request",
        )
    if "azure2019-invocations" in kinds:
        return _azure2019(kinds)
    if "huawei-wide" in kinds:
        return _huawei_wide(kinds["huawei-wide"])
    if "huawei-coldstart" in kinds:
        df = R.read_coldstarts(kinds["huawei-coldstart"])
        return Source(
            exact=df.select(pl.col("funcID").alias("function"), pl.col("time").alias("t")),
            kind="huawei-coldstart",
        )
    raise ValueError(
        f"{', '.join(map(str, paths))}: no arrival information (need Azure 2021, Huawei per-request, "
        f"Azure 2019 invocations, a Huawei wide requests table or a cold-start table); found {sorted(kinds) or 'nothing'}"
    )


def _azure2019(kinds: dict[str, list[TraceFile]]) -> Source:
    """Per-minute invocation counts, with the durations' and memory's percentiles when the
    dataset's other tables are there."""
    inv = R.read_azure2019_invocations(kinds["azure2019-invocations"], long=True)
    counts = inv.select(
        pl.col("HashFunction").alias("function"),
        (pl.col("abs_minute") * 60.0).alias("t0"),
        pl.lit(60.0).alias("width"),
        pl.col("count").cast(pl.Int64),
    )
    src = Source(counts=counts, kind="azure2019")
    if "azure2019-durations" in kinds:
        d = R.load(kinds["azure2019-durations"]).unique("HashFunction", keep="first")
        src.durations = d.unpivot(
            index=["HashFunction"],
            on=[c for _, c in S.DURATION_PERCENTILES],
            variable_name="c",
            value_name="value",
        ).select(
            pl.col("HashFunction").alias("function"),
            pl.col("c").str.extract(r"(\d+)$", 1).cast(pl.Float64).alias("q"),
            pl.col("value"),
        )
    if "azure2019-memory" in kinds:
        m = R.load(kinds["azure2019-memory"]).unique("HashApp", keep="first")
        apps = inv.select("HashApp", "HashFunction").unique()
        mm = m.unpivot(
            index=["HashApp"],
            on=[c for _, c in S.MEMORY_PERCENTILES],
            variable_name="c",
            value_name="value",
        ).with_columns(pl.col("c").str.extract(r"(\d+)$", 1).cast(pl.Float64).alias("q"))
        src.memory = apps.join(mm, on="HashApp").select(
            pl.col("HashFunction").alias("function"), "q", "value"
        )
    return src


def _huawei_wide(files: list[TraceFile]) -> Source:
    """Per-bin counts from a wide requests table; the bin is the smallest step between times."""
    long = R.read_wide(files, long=True)
    ts = long["time"].unique().sort().to_numpy()
    width = float(np.min(np.diff(ts))) if ts.size > 1 else 60.0
    return Source(
        counts=long.select(
            "function",
            pl.col("time").alias("t0"),
            pl.lit(width).alias("width"),
            pl.col("value").round(0).cast(pl.Int64).alias("count"),
        ).filter(pl.col("count") > 0),
        kind="huawei-wide",
    )
