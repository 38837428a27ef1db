"""The cold-start benchmark's idle pool starts: the idle is measured from the status polls'
stamps and the request's first write (not assumed from the sleep), only starts the records mark
from the pool count, and the idle floor's samples stay apart from the floor's own and end with
its processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from benchmark_module import load_benchmark
from realnode import alive

cold_start = load_benchmark("cold_start")
pool_idle = cold_start.pool_idle


class Stamped:
    """A readiness predicate that turns true at its `at`-th call, stamping each call."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls: list[float] = []

    def __call__(self) -> bool:
        self.calls.append(time.time())
        return len(self.calls) >= self.at


def test_the_ready_moment_is_bracketed_by_the_polls_around_it():
    polls = [pool_idle.Poll(1.0, 1.1, False), pool_idle.Poll(2.0, 2.1, False)]
    assert pool_idle.bracket([*polls, pool_idle.Poll(3.0, 3.2, True)]) == (2.0, 3.2)
    assert pool_idle.bracket([pool_idle.Poll(3.0, 3.2, True)]) == (None, 3.2)  # ready at once
    with pytest.raises(ValueError):
        pool_idle.bracket(polls)  # never ready: no bracket

    ready = Stamped(3)
    seen = pool_idle.wait_ready(ready)
    assert len(ready.calls) == 3
    # the last not-ready poll was sent before its check, the ready one answered after its own
    assert ready.calls[0] < seen.after <= ready.calls[1] <= ready.calls[2] <= seen.by


def test_an_idle_start_measures_its_idle_from_the_ready_poll_to_the_requests_write():
    ready = Stamped(2)
    wrote: list[float] = []

    def call() -> tuple[float, float]:
        time.sleep(0.1)  # a client slow to write its request: the instance waits on
        wrote.append(time.time())
        return 1.5, wrote[-1]

    got = pool_idle.idle_start("cb-i-0", ready, call, idle_s=0.05)
    assert got.name == "cb-i-0" and got.first_ms == 1.5
    seen_by = wrote[0] - got.idle_s  # the ready poll's answer the idle was measured from
    assert ready.calls[1] <= seen_by
    assert got.idle_s >= 0.15  # the idle asked for and the client's delay: measured, not assumed
    assert got.bracket_ms is not None and got.bracket_ms >= (ready.calls[1] - ready.calls[0]) * 1000
    # seen ready at the first poll: how long before it the instance was ready is unknown
    assert pool_idle.idle_start("cb-i-1", Stamped(1), call, idle_s=0.0).bracket_ms is None


def _rec(t0: float, from_pool: bool = True) -> dict:
    """A cold-start record's shape (coldstarts.py), its phases 1 ms apart from t0 on."""
    keys = ("requested", "spawned", "process_started", "code_imported", "ready")
    return {"from_pool": from_pool, "phases": {k: t0 + i / 1000 for i, k in enumerate(keys)}}


def test_only_starts_from_the_pool_count_and_the_ratios_are_against_the_short_idle_ones():
    S = pool_idle.IdleStart
    starts = [
        S("a", 6.0, 99.9, 2.01, 8.0),
        S("b", 40.0, 0.0, 2.02, 9.0),
        S("c", 4.0, 0, 2.05, None),
    ]
    recs = {"a": _rec(100.0), "b": _rec(0.0, from_pool=False), "c": _rec(0.0)}
    fig = pool_idle.figures(starts, recs, [], 2.5, 0.5, [0.9, 1.1, 1.3])
    assert fig["warm_pool_idle_samples"] == [6.0, 4.0]  # b was not a pool start
    assert fig["warm_pool_idle_ms"] == 5.0 and fig["warm_pool_idle_from_pool"] == "2/3"
    assert fig["warm_pool_idle_s"] == 2.03 and fig["warm_pool_idle_bracket_ms"] == 8.0
    assert fig["ratio_warm_pool_idle_vs_short"] == 2.0
    assert fig["pool_floor_idle_ms"] == 1.1 and fig["ratio_pool_floor_idle_vs_short"] == 2.2
    # a start's steps: its write, its record's phases, its first line (written at 99.9 s,
    # requested 100 s, the phases 1 ms apart, the first line 6 ms after the write)
    one = pool_idle.steps([(99.9, 106.0, _rec(100.0))])
    assert one == pytest.approx(
        {
            "client_to_agent": 100.0,
            "agent_to_spec_sent": 1.0,
            "spec_to_import": 1.0,
            "import": 1.0,
            "imported_to_ready": 1.0,
            "ready_to_first_line": 2.0,
        }
    )
    assert pool_idle.steps([(0.0, 1.0, _rec(0.0, from_pool=False)), (0.0, 1.0, None)]) == {
        s: pytest.approx(float("nan"), nan_ok=True) for s in pool_idle.STEPS
    }  # neither a pool start: no steps


def test_idle_floor_samples_stay_apart_from_the_floors_own_and_end_with_its_processes(tmp_path):
    fl = cold_start.pool_floor.Floor(tmp_path)
    calls: list[cold_start.Timed] = []

    def call() -> float:
        calls.append(cold_start.timed_call(fl, "floor", b"{}", "application/json"))
        return calls[-1].first_ms

    with fl:
        server = fl.proc.pid
        kids = [int(c) for c in Path(f"/proc/{server}/task/{server}/children").read_text().split()]
        got = pool_idle.floor_idle_samples(call, 2, 0.05)
    assert len(calls) == 3  # one to start the first sample's idle, not kept
    assert got == [t.first_ms for t in calls[1:]] and all(x > 0 for x in got)
    assert fl.samples == []  # pool_floor_ms is the short-idle samples' alone
    assert len(kids) == 2 and not any(alive(p) for p in [server, *kids])
    assert not fl.dir.exists()
