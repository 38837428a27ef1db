"""The replay driver as a Hearth function: one instance replays one schedule shard.

``hearth replay --shards N --via-function replay-driver`` cuts the schedule (by function or time
window) and invokes this function once per shard; every shard carries the same ``start_at``
(epoch seconds), so all instances send on one clock. The response holds the shard's records
(columns as lists) and its summary; on a failed health check, ``error`` says why and the
records so far are still returned.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import polars as pl
from hearth.sdk import Event, HandlerError

from .driver import DriverConfig, ReplayAborted, run_schedule

SCHEDULE_COLUMNS = ("seq", "t", "function", "duration_ms", "memory_mb", "phase")


def parse_shard(body: dict) -> tuple[pl.DataFrame, DriverConfig]:
    """Validate a shard request; errors name the field."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    sched = body.get("schedule")
    if not isinstance(sched, dict):
        raise ValueError("schedule: required, an object of equal-length column lists")
    missing = [c for c in ("t", "function") if c not in sched]
    if missing:
        raise ValueError(f"schedule.{missing[0]}: required column")
    n = len(sched["t"])
    for c, v in sched.items():
        if c in SCHEDULE_COLUMNS and (not isinstance(v, list) or len(v) != n):
            raise ValueError(f"schedule.{c}: expected a list of {n} values")
    try:
        df = pl.DataFrame({c: sched[c] for c in SCHEDULE_COLUMNS if c in sched}, strict=False)
        df = df.with_columns(pl.col("t").cast(pl.Float64), pl.col("function").cast(pl.String))
    except pl.exceptions.PolarsError as e:
        raise ValueError(
            f"schedule: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    target = body.get("target")
    if not isinstance(target, str) or not target:
        raise ValueError("target: required ('hearth' or a base URL)")
    cfg = DriverConfig(
        target=target,
        function=body.get("function"),
        start_at=float(body["start_at"]) if body.get("start_at") is not None else None,
        max_lag_ms=float(body.get("max_lag_ms", 50.0)),
        max_failure_rate=float(body.get("max_failure_rate", 0.05)),
        progress=False,
        invoke_async=bool(body.get("invoke_async", False)),
    )
    return df, cfg


async def dispatch(event: Event) -> dict:
    try:
        df, cfg = parse_shard(event.json())
    except (ValueError, TypeError, KeyError, pl.exceptions.PolarsError) as e:
        raise HandlerError(str(e), status=400) from None
    try:
        res = await run_schedule(df, cfg)
    except ReplayAborted as e:
        recs = e.records if e.records is not None else pl.DataFrame()
        return {"error": str(e), "records": recs.to_dict(as_series=False), "summary": None}
    return {"records": res.records.to_dict(as_series=False), "summary": res.summary}
