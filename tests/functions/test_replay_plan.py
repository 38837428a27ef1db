"""The replay driver's decisions, without a target: the plan (order, targets, bodies), how an
answer is recorded, the running health check, and waiting for the planned instant."""

from __future__ import annotations

import json
import time

import numpy as np
import polars as pl
import pytest
from hearth.functions.replay import driver as D
from hearth.functions.replay import health as HC
from hearth.functions.replay import pacing as PC
from hearth.functions.replay.records import Recorder


def test_plan_orders_by_time_stably_and_builds_each_body():
    df = pl.DataFrame(
        {
            "seq": [0, 1, 2, 3],
            "t": [0.2, 0.1, 0.2, 0.0],
            "function": ["Fn_A", "fn-b", "Fn_A", "7x"],
            "duration_ms": [5.0, 6.0, 7.0, 8.0],
            "memory_mb": [64, 128, 256, 512],
        }
    )
    p = D.plan(df, D.DriverConfig(target="http://h:1/"))
    assert p.t.tolist() == [0.0, 0.1, 0.2, 0.2]
    assert p.seq.tolist() == [3, 1, 0, 2]  # equal times keep their order
    assert p.names == ["f-7x", "fn-b", "fn-a", "fn-a"]
    assert p.trace_functions == ["7x", "fn-b", "Fn_A", "Fn_A"]
    assert p.phase == ["main"] * 4
    assert json.loads(p.bodies[2]) == {
        "function": "Fn_A",
        "duration_ms": 5.0,
        "memory_mb": 64.0,
        "seq": 0,
    }
    assert p.urls == {
        "f-7x": "http://h:1/v1/functions/f-7x:invoke",
        "fn-b": "http://h:1/v1/functions/fn-b:invoke",
        "fn-a": "http://h:1/v1/functions/fn-a:invoke",
    }
    assert p.headers["Content-Type"] == "application/json"


def test_plan_single_function_and_missing_columns():
    df = pl.DataFrame({"t": [0.0, 1.0], "function": ["a", "b"]})
    cfg = D.DriverConfig(target="http://h:1", function="one", invoke_async=True)
    p = D.plan(df, cfg)
    assert p.names == ["one", "one"]
    assert p.urls == {"one": "http://h:1/v1/functions/one:invoke?async=1"}
    assert [json.loads(b) for b in p.bodies] == [
        {"function": "a", "duration_ms": 0.0, "memory_mb": 0.0, "seq": 0},
        {"function": "b", "duration_ms": 0.0, "memory_mb": 0.0, "seq": 1},
    ]


def test_recorder_reads_the_answer():
    rec = Recorder(5)
    rec.response(0, 200, {"x-hearth-cold": "1", "x-hearth-instance": "i-1"})
    rec.response(1, 202, {}, b'{"invocation_id": "inv-9"}')
    rec.response(2, 202, {"x-hearth-invocation": "inv-h"}, b"not json")
    rec.response(3, 503, {"x-hearth-cold": " false "})
    rec.response(4, 202, {"x-hearth-invocation": "inv-h"}, b'{"invocation_id": "inv-b"}')
    assert rec.cold.tolist() == [1, -1, -1, 0, -1]
    assert rec.instance == ["i-1", None, None, None, None]
    assert rec.invocation == [None, "inv-9", "inv-h", None, "inv-h"]  # the header wins
    assert rec.error == [None, None, None, "HTTP 503", None]
    assert rec.nfail == 1
    rec.failure(0, ConnectionRefusedError("refused"))
    assert (rec.status[0], rec.error[0], rec.nfail) == (0, "ConnectionRefusedError: refused", 2)


def _sent(lags_ms: list[float], statuses: list[int]) -> tuple[Recorder, np.ndarray]:
    """A recorder where invocation i was due at i seconds, sent lags_ms[i] late and answered
    with statuses[i] (0: no answer)."""
    n = len(lags_ms)
    rec = Recorder(n)
    due = np.arange(n, dtype=float)
    rec.sent[:] = due + np.asarray(lags_ms) / 1000
    rec.done[:] = rec.sent + 0.001
    for i, st in enumerate(statuses):
        if st:
            rec.response(i, st, {})
        else:
            rec.failure(i, TimeoutError("late"))
    rec.order = list(range(n))
    rec.nsent = rec.ndone = n
    return rec, due


def test_running_check_waits_for_min_samples_then_judges_the_window():
    cfg = D.DriverConfig(min_samples=10, health_window=20, max_lag_ms=5, max_failure_rate=0.1)
    rec, due = _sent([50.0] * 9, [200] * 9)
    assert HC.running_check(rec, due, cfg) is None  # 9 < min_samples
    rec, due = _sent([50.0] * 10 + [1.0] * 20, [200] * 30)
    assert HC.running_check(rec, due, cfg) is None  # the slow ones left the window
    rec, due = _sent([1.0] * 30 + [50.0], [200] * 31)
    why = HC.running_check(rec, due, cfg)
    assert why.startswith("send lag p99 ") and "over the last 20 invocations" in why
    rec, due = _sent([1.0] * 30, [200] * 27 + [500, 0, 0])
    why = HC.running_check(rec, due, cfg)
    assert why.startswith("failure rate 15.0% over the last 20 responses") and "HTTP 500" in why
    rec, due = _sent([1.0] * 30, [200] * 28 + [500, 0])
    assert HC.running_check(rec, due, cfg) is None  # 10% is not above 10%


def test_recent_lag_p99():
    assert HC.recent_lag_p99(Recorder(3), np.zeros(3), 500) == 0.0
    rec, due = _sent([1.0, 2.0, 30.0], [200] * 3)
    assert HC.recent_lag_p99(rec, due, 2) == pytest.approx(np.percentile([2.0, 30.0], 99))


async def test_wait_until_returns_at_the_instant_not_before():
    for ahead in (0.0005, 0.004, -1.0):
        target = time.perf_counter() + ahead
        await PC.wait_until(target, busy=150e-6)
        assert time.perf_counter() >= target
