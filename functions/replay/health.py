"""The replay's health checks, pure: from what was recorded so far, the reason to abort, or None.

While sending, over the last ``health_window`` sends (once ``min_samples`` have been sent): the
p99 send lag against ``max_lag_ms``, then the failure rate of the answered ones against
``max_failure_rate``. After a run that completed, the failure rate over all its responses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from .driver import DriverConfig
    from .records import Recorder


def lag_ms(rec: Recorder, planned: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Send lag of invocations ``idx``: when each was sent minus when it was due (``planned``:
    due times on the sender's ``perf_counter`` clock)."""
    return (rec.sent[idx] - planned[idx]) * 1000.0


def recent_lag_p99(rec: Recorder, planned: np.ndarray, last: int) -> float:
    """p99 send lag (ms) over the last ``last`` sends; 0 before the first."""
    if not rec.nsent:
        return 0.0
    return float(np.nanpercentile(lag_ms(rec, planned, np.asarray(rec.order[-last:])), 99))


def running_check(rec: Recorder, planned: np.ndarray, cfg: DriverConfig) -> str | None:
    """Why the run must stop now, or None (see the module docstring)."""
    if rec.nsent < cfg.min_samples:
        return None
    idx = np.asarray(rec.order[-cfg.health_window :])
    p99 = float(np.nanpercentile(lag_ms(rec, planned, idx), 99))
    if p99 > cfg.max_lag_ms:
        return (
            f"send lag p99 {p99:.1f} ms over the last {idx.size} invocations exceeds "
            f"--max-lag-ms {cfg.max_lag_ms:g} (the sender cannot keep up; lower the rate or shard)"
        )
    done_idx = idx[~np.isnan(rec.done[idx])]
    if done_idx.size >= cfg.min_samples:
        fails = np.mean([(rec.status[j] == 0 or rec.status[j] >= 400) for j in done_idx])
        if fails > cfg.max_failure_rate:
            errs = [rec.error[j] for j in done_idx if rec.error[j]]
            return (
                f"failure rate {fails:.1%} over the last {done_idx.size} responses exceeds "
                f"--max-failure-rate {cfg.max_failure_rate:.1%} (e.g. {errs[0] if errs else '?'})"
            )
    return None


def final_failure_check(
    summary: dict, max_failure_rate: float, records: pl.DataFrame | None = None
) -> str | None:
    """The failure-rate check over the whole run. The running health check needs
    ``min_samples`` responses; this one applies to every run, however short."""
    n = summary.get("invocations", 0)
    if not n:
        return None
    rate = summary["failed"] / n
    if rate <= max_failure_rate:
        return None
    eg = "?"
    if records is not None and "error" in records.columns:
        errs = records["error"].drop_nulls()
        if errs.len():
            eg = errs[0]
    return (
        f"failure rate {rate:.1%} over all {n} responses exceeds "
        f"--max-failure-rate {max_failure_rate:.1%} (e.g. {eg})"
    )
