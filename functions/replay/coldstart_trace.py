"""A cold-start trace as read (:class:`Trace`, :func:`load_trace`) and as analysed
(:class:`Analysis`): the data that flows through ``analyze``, the figures and the report."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from . import readers as R


@dataclass
class Trace:
    label: str
    cold: pl.DataFrame
    runtime: pl.DataFrame | None = None
    requests: pl.DataFrame | None = None
    skipped: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)


class AnalysisError(ValueError):
    """The inputs cannot be analysed (e.g. no cold-start table among them)."""


def load_trace(paths: list[str | Path], label: str | None = None) -> Trace:
    skipped: list[str] = []
    kinds = R.classify(paths, skipped=skipped)
    if "huawei-coldstart" not in kinds:
        found = ", ".join(sorted(kinds)) or "nothing readable"
        raise AnalysisError(
            f"{', '.join(map(str, paths))}: no cold-start table (Huawei cold-start columns) found; got {found}"
        )
    # requestID is only needed to match per-request rows; without them it is not built
    skip = () if "huawei-request" in kinds else ("requestID",)
    cold = R.read_coldstarts(kinds["huawei-coldstart"], exclude=skip)
    if cold.height == 0:  # every statistic and figure needs at least one cold start
        names = ", ".join(str(f.path) for f in kinds["huawei-coldstart"])
        raise AnalysisError(f"{names}: line 2: no cold starts (the table holds a header only)")
    runtime = R.read_runtime(kinds["huawei-runtime"]) if "huawei-runtime" in kinds else None
    req = R.read_requests(kinds["huawei-request"]) if "huawei-request" in kinds else None
    lab = label or ", ".join(Path(p).name or str(p) for p in paths)
    return Trace(lab, cold, runtime, req, skipped, {k: len(v) for k, v in kinds.items()})


@dataclass
class Analysis:
    label: str
    stats: dict
    curves: dict  # arrays for figures (not in JSON)
    timings: dict = field(default_factory=dict)  # wall seconds per stage
