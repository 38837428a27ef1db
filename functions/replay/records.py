"""What a replay recorded: per-invocation outcomes as they arrive, then the records table (the
Huawei per-request columns plus Hearth's extras), its summary, and writing it out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from .driver import Clock, DriverConfig, Plan


class Recorder:
    """One slot per planned invocation (NaN/-1/None until it happens), filled by the sender."""

    def __init__(self, n: int):
        self.sent = np.full(n, np.nan)
        self.done = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int32)
        self.cold = np.full(n, -1, dtype=np.int8)
        self.instance: list[str | None] = [None] * n
        self.invocation: list[str | None] = [None] * n
        self.error: list[str | None] = [None] * n
        self.nsent = 0
        self.ndone = 0
        self.nfail = 0
        self.order: list[int] = []  # indices in send order (for the health window)

    def response(self, i: int, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        """Invocation ``i`` was answered: its status, the invocation id (a 202's body, else the
        gateway's header), whether it ran cold and on which instance. ``headers`` must match
        names case-insensitively (aiohttp's CIMultiDict, the raw client's lower-cased dict)."""
        self.status[i] = status
        if status == 202 and body:
            try:
                self.invocation[i] = json.loads(body).get("invocation_id")
            except (ValueError, AttributeError):
                pass
        c = headers.get("x-hearth-cold")
        if c is not None:
            self.cold[i] = 1 if c.strip() in ("1", "true", "True") else 0
        self.instance[i] = headers.get("x-hearth-instance")
        self.invocation[i] = headers.get("x-hearth-invocation") or self.invocation[i]
        if status >= 400:
            self.nfail += 1
            self.error[i] = f"HTTP {status}"

    def failure(self, i: int, e: Exception) -> None:
        """Invocation ``i`` got no answer (connection refused, timeout...): status 0."""
        self.status[i] = 0
        self.error[i] = f"{type(e).__name__}: {e}"[:200]
        self.nfail += 1


COLUMNS = (  # the Huawei per-request columns, then Hearth's
    "time_worker",
    "time_frontend",
    "requestID",
    "clusterName",
    "funcName",
    "podID",
    "userID",
    "totalCost_worker",
    "workerCost",
    "runtimeCost",
    "totalCost_frontend",
    "frontendCost",
    "busCost",
    "readBodyCost",
    "writeRspCost",
    "cpu_usage",
    "memory_usage",
    "requestBodySize",
    "planned_s",
    "sent_s",
    "lag_s",
    "status",
    "cold",
    "instance",
    "invocation",
    "phase",
    "trace_function",
    "error",
)


def build_records(plan: Plan, rec: Recorder, clock: Clock, cfg: DriverConfig) -> pl.DataFrame:
    """The records table, one row per planned invocation in plan order (unsent rows: NaN)."""
    sent_rel = rec.sent - clock.t0
    rt = rec.done - rec.sent
    epoch_sent = clock.wall0 + (rec.sent - clock.perf0)
    n = len(plan.names)
    null_f = pl.lit(None, dtype=pl.Float64)
    base = pl.DataFrame(
        {
            "time_worker": np.round(epoch_sent, 6),
            "requestID": [rec.invocation[i] or f"replay-{int(s)}" for i, s in enumerate(plan.seq)],
            "clusterName": [cfg.cluster] * n,
            "funcName": plan.names,
            "podID": rec.instance,
            "userID": [cfg.user] * n,
            "totalCost_worker": rt,
            "requestBodySize": np.array([len(b) for b in plan.bodies], dtype=float),
            "planned_s": plan.t,
            "sent_s": sent_rel,
            "lag_s": sent_rel - plan.t,
            "status": rec.status.astype(np.int64),
            "cold": pl.Series([None if c < 0 else bool(c) for c in rec.cold], dtype=pl.Boolean),
            "instance": rec.instance,
            "invocation": rec.invocation,
            "phase": plan.phase,
            "trace_function": plan.trace_functions,
            "error": rec.error,
        },
        schema_overrides={
            "podID": pl.String,
            "instance": pl.String,
            "invocation": pl.String,
            "error": pl.String,
        },
    )
    return base.with_columns(
        pl.col("time_worker").alias("time_frontend"),
        null_f.alias("workerCost"),
        null_f.alias("runtimeCost"),
        pl.col("totalCost_worker").alias("totalCost_frontend"),
        null_f.alias("frontendCost"),
        null_f.alias("busCost"),
        null_f.alias("readBodyCost"),
        null_f.alias("writeRspCost"),
        null_f.alias("cpu_usage"),
        null_f.alias("memory_usage"),
    ).select(COLUMNS)


def summarize(records: pl.DataFrame) -> dict:
    r = records.filter(pl.col("sent_s").is_not_nan())
    n = r.height
    if n == 0:
        return {"invocations": 0}
    planned = r["planned_s"].to_numpy()
    sent = r["sent_s"].to_numpy()
    lag_ms = r["lag_s"].to_numpy() * 1000
    rt = r["totalCost_worker"].to_numpy() * 1000
    ok = r.filter((pl.col("status") >= 200) & (pl.col("status") < 400))
    span_p = planned.max() - planned.min()
    span_a = sent.max() - sent.min()
    planned_rate = (n - 1) / span_p if span_p > 0 else float("nan")
    achieved_rate = (n - 1) / span_a if span_a > 0 else float("nan")
    cold = r["cold"]
    return {
        "invocations": n,
        "ok": ok.height,
        "failed": n - ok.height,
        "planned_rate": planned_rate,
        "achieved_rate": achieved_rate,
        "rate_error_pct": 100 * (achieved_rate - planned_rate) / planned_rate
        if span_p > 0
        else None,
        "lag_ms_p50": float(np.percentile(lag_ms, 50)),
        "lag_ms_p99": float(np.percentile(lag_ms, 99)),
        "lag_ms_max": float(lag_ms.max()),
        "response_ms_p50": float(np.nanpercentile(rt, 50)),
        "response_ms_p99": float(np.nanpercentile(rt, 99)),
        "cold": int(cold.sum() or 0),
        "warm": int((~cold).sum() or 0),
        "cold_unknown": int(cold.null_count()),
        "status_counts": {str(k): int(v) for k, v in r.group_by("status").len().rows()},
    }


def write_records(records: pl.DataFrame, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.name.endswith((".parquet", ".pq")):
        records.write_parquet(p)
    elif p.name.endswith(".csv"):
        records.write_csv(p)
    else:
        raise ValueError(f"{p}: records are written as .parquet or .csv")
    return p
