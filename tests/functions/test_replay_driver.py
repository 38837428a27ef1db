"""The open-loop replay driver against a real `hearth up` gateway serving the real workload
function: every record is checked against what the gateway saw (its invocation counters,
cold-start log and instance table). Also the workload and driver handlers, and the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hearth.functions.replay import driver as D
from hearth.functions.replay import handlers as H
from hearth.functions.replay import readers as R
from hearth.functions.replay import schedule as SC
from hearth.functions.replay import workload as W
from hearth.sdk import Context, Event, HandlerError
from realnode import live_instances, metric, start_checked, wait_for

WORKLOAD = "hearth.functions.replay.workload:handle"
FAIL = "hearth.functions.examples.handlers:fail"


@pytest.fixture(scope="module")
def gw(redis_server, tmp_path_factory):
    """A real `hearth up` (gateway, node agent, proxy, instance processes) the driver replays
    against; each test deploys its own functions, so counts and cold starts are its own."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    node = start_checked(tmp_path_factory.mktemp("hearth-replay"), redis_url=redis_server.url)
    yield Gateway(node)
    node.stop()


class Gateway:
    """What the real gateway saw: its metrics, cold-start log and instance table."""

    def __init__(self, node):
        self.node = node
        self.c = node.client
        self.url = node.url
        self.deployed: set[str] = set()

    def deploy(self, *names: str, handler: str = WORKLOAD, max_instances: int = 1) -> None:
        """Deploy once per module: tests share warm functions (each cold start costs seconds on
        a busy machine) and compare what changed (see `snapshot`)."""
        for name in names:
            if name in self.deployed:
                continue
            self.deployed.add(name)
            self.c.deploy(
                {
                    "name": name,
                    "handler": handler,
                    "concurrency": 8,
                    "max_instances": max_instances,
                    "queue_size": 10000,
                    "timeout_s": 60,
                    "resources": {"memory_mb": 128, "cpu_millicores": 100},
                    "keep_alive": {"policy": "fixed", "ttl_s": 600},
                }
            )

    def warm(self, *names: str) -> None:
        """One invocation each, so the instance is up before a test measures anything."""
        for name in names:
            self.c.request("POST", f"/v1/functions/{name}:invoke", b"{}", ok=(200, 500))

    def invocations(self, name: str, status: str | None = None) -> int:
        labels = {"function": name} | ({"status": status} if status else {})
        return int(metric(self.c, "hearth_invocations_total", **labels))

    def cold_starts(self, name: str) -> list[dict]:
        recs = self.c.request("GET", "/v1/coldstarts", admin=True).json()["coldstarts"]
        return [r for r in recs if r["function"] == name]

    def snapshot(self, names: list[str]) -> dict[str, tuple[int, int, int]]:
        """(invocations, cold starts, invocations served) per function, to compare against."""
        return {
            n: (self.invocations(n), len(self.cold_starts(n)), sum(self.served(n).values()))
            for n in names
        }

    def served(self, name: str) -> dict[str, int]:
        return {i["id"]: i["served"] for i in live_instances(self.c, name)}

    def result(self, invocation: str) -> dict:
        return wait_for(
            lambda: (r := self.c.invocation(invocation))["status"] in ("succeeded", "failed") and r,
            what=f"the result of {invocation}",
        )


def _agrees_with_gateway(
    gw: Gateway, rec: pl.DataFrame, before: dict[str, tuple[int, int, int]]
) -> None:
    """Each record matches what the gateway counted since `before`: one invocation per record
    and function, one cold record per new cold start in the gateway's log (same instances),
    the instances' served counts, distinct invocation ids."""
    assert set(rec["funcName"]) <= set(before), set(rec["funcName"])
    for name, (calls0, colds0, served0) in before.items():
        mine = rec.filter(pl.col("funcName") == name)
        assert gw.invocations(name) - calls0 == mine.height, name
        starts = gw.cold_starts(name)
        new = starts[colds0:]
        assert mine["cold"].sum() == len(new), (name, new)
        assert set(mine.filter(pl.col("cold"))["instance"]) <= {r["instance"] for r in new}
        assert set(mine["instance"]) <= {r["instance"] for r in starts}
        assert sum(gw.served(name).values()) - served0 == mine.height
    assert rec["requestID"].n_unique() == rec.height  # the gateway's invocation ids


def _cfg(url: str, **kw) -> D.DriverConfig:
    # the server shares this process's event loop: no lag threshold unless a test sets one
    kw.setdefault("max_lag_ms", 1e6)
    # a busy shared machine can hold a burst behind a cold start for tens of seconds: the
    # records must still agree with the gateway, so wait generously rather than time out
    kw.setdefault("timeout_s", 300)
    return D.DriverConfig(target=url, progress=False, **kw)


async def test_replay_sends_everything_in_order_and_records_outcomes(gw, tmp_path):
    s = SC.build(
        SC.Source(
            exact=pl.DataFrame({"function": ["Fn_A", "fn-b"] * 150, "t": np.arange(300) * 0.002}),
            kind="t",
        ),
        # 5 ms and 1 MiB each (defaults: 100 ms, 128 MiB allocated and touched): what is checked
        # is order, records and agreement with the gateway, not the work, which took 30-50 s on
        # one instance per function (responses p50 15 s)
        SC.ScheduleParams(default_duration_ms=5, default_memory_mb=1),
    )
    assert (s.df["duration_ms"] == 5).all() and (s.df["memory_mb"] == 1).all()
    gw.deploy("fn-a", "fn-b")  # trace names Fn_A / fn-b, made DNS-safe by the driver
    before = gw.snapshot(["fn-a", "fn-b"])
    res = await D.run_schedule(s.df, _cfg(gw.url))
    rec = res.records
    assert rec.height == 300
    assert (rec["status"] == 200).all(), rec.filter(pl.col("status") != 200).head()
    assert sorted(rec["funcName"].unique()) == ["fn-a", "fn-b"]
    _agrees_with_gateway(gw, rec, before)
    # cold/warm from X-Hearth-Cold: one instance each (max_instances 1), so one cold each
    assert rec.filter(pl.col("cold"))["funcName"].sort().to_list() == ["fn-a", "fn-b"]
    assert rec["instance"].n_unique() == 2
    # every planned time honoured: never early, and the lag is recorded
    assert (rec["lag_s"] >= -1e-6).all()
    assert np.allclose(rec["planned_s"].to_numpy(), s.df["t"].to_numpy())
    assert res.summary["invocations"] == 300 and res.summary["failed"] == 0
    # the records are in the Huawei per-request columns plus extras: the reader accepts them
    out = D.write_records(rec, tmp_path / "rec.csv")
    back = R.read_requests(out)
    assert back.height == 300 and "lag_s" in back.columns
    assert R.inspect(D.write_records(rec, tmp_path / "rec.parquet")).kind == "huawei-request"


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_single_function_routing_puts_trace_function_in_body(gw, client):
    name = "workload"
    gw.deploy(name)
    before = gw.snapshot([name])
    s = SC.constant_rate(500, 0.2, function="trace-fn-x", duration_ms=3)
    res = await D.run_schedule(s.df, _cfg(gw.url, function=name, client=client))
    assert res.records["cold"].to_list()[1:] == [False] * 99  # at most the first was cold
    assert (res.records["funcName"] == name).all()
    assert res.records["trace_function"].unique().to_list() == ["trace-fn-x"]
    _agrees_with_gateway(gw, res.records, before)
    # the body the workload got: the trace function and duration (its reply says what it ran)
    r = gw.c.invoke(name, b'{"function": "probe", "duration_ms": 3, "seq": 7}', "application/json")
    out = r.json()
    assert out["function"] == "probe" and out["seq"] == 7 and out["elapsed_ms"] >= 3


def _half_failing(rate: float, seconds: float, ok: str, bad: str) -> pl.DataFrame:
    """Every other invocation goes to a function whose handler raises (HTTP 500)."""
    df = SC.constant_rate(rate, seconds).df
    return df.with_columns(
        pl.Series("function", [ok if i % 2 == 0 else bad for i in range(df.height)])
    )


async def test_failure_rate_health_check_aborts(gw):
    gw.deploy("half-ok")
    gw.deploy("half-bad", handler=FAIL)
    gw.warm("half-ok", "half-bad")  # serving before the replay: failures come back at once
    before = gw.invocations("half-ok") + gw.invocations("half-bad")
    df = _half_failing(200, 20.0, "half-ok", "half-bad")  # 4000 planned over 20 s
    with pytest.raises(D.ReplayAborted, match=r"failure rate [3-6]\d\.\d% .* exceeds") as ei:
        await D.run_schedule(df, _cfg(gw.url, min_samples=100, health_window=400))
    assert ei.value.records is not None
    sent = gw.invocations("half-ok") + gw.invocations("half-bad") - before
    assert 100 <= sent < 4000  # stopped early, after the minimum sample
    assert gw.invocations("half-bad", "500") == gw.invocations("half-bad")


async def test_lag_health_check_aborts(gw):
    # 4000 invocations all planned at t=0: nobody can send them within 1 ms
    gw.deploy("workload")
    before = gw.invocations("workload")
    df = pl.DataFrame(
        {"seq": np.arange(4000), "t": np.zeros(4000), "function": ["workload"] * 4000}
    )
    with pytest.raises(D.ReplayAborted, match=r"send lag p99 .* exceeds --max-lag-ms 1"):
        await D.run_schedule(df, _cfg(gw.url, max_lag_ms=1.0, min_samples=200, health_window=500))
    assert gw.invocations("workload") - before < 4000  # aborted before the end


async def test_unreachable_target_is_a_recorded_failure():
    s = SC.constant_rate(100, 0.1)
    res = await D.run_schedule(
        s.df, _cfg("http://127.0.0.1:9", min_samples=10_000, timeout_s=2, max_failure_rate=1.0)
    )
    assert (res.records["status"] == 0).all()
    assert res.records["error"].str.contains("Connect").all()


async def test_dispatch_handler_replays_a_shard(gw):
    gw.deploy("workload")
    before = gw.invocations("workload", "200")
    s = SC.constant_rate(400, 0.25, function="workload")
    shard = SC.shard(s, 2, by="time")[1]
    body = {
        "target": gw.url,
        "schedule": {c: shard.df[c].to_list() for c in H.SCHEDULE_COLUMNS},
    }
    ev = Event(
        memoryview(json.dumps(body).encode()),
        Context("replay-driver", "i", "x", 1e12),
        "application/json",
    )
    out = await H.dispatch(ev)
    sent = gw.invocations("workload", "200") - before
    assert out["summary"]["invocations"] == shard.invocations == sent
    assert len(out["records"]["lag_s"]) == shard.invocations
    bad = Event(
        memoryview(b'{"target": "x"}'), Context("replay-driver", "i", "x", 1e12), "application/json"
    )
    with pytest.raises(HandlerError, match="schedule"):
        await H.dispatch(bad)


async def test_local_shards_share_one_clock(gw):
    gw.deploy("workload")
    before = gw.snapshot(["workload"])
    s = SC.constant_rate(1000, 0.3, function="workload")
    res = await D.run_shards([p.df for p in SC.shard(s, 3, by="time")], _cfg(gw.url))
    assert res.records.height == 300
    assert res.records["planned_s"].is_sorted()
    _agrees_with_gateway(gw, res.records, before)


def test_workload_busy_sleep_and_allocate():
    out = W.run_work(20, 8, "busy")
    assert out["elapsed_ms"] >= 20 and out["memory_mb"] == 8
    assert W.run_work(10, 0, "sleep")["elapsed_ms"] >= 10
    # capped by the deadline: asked for 5 s with 50 ms left, stops far (20×) short of it
    assert W.run_work(5000, 0, "busy", deadline_s=0.05)["elapsed_ms"] < 1000
    ev = Event(
        memoryview(b'{"duration_ms": 5, "memory_mb": 1, "seq": 3}'),
        Context("w", "inst-1", "x", 1e12),
        "application/json",
    )
    r = W.handle(ev)
    assert r["seq"] == 3 and r["instance"] == "inst-1" and r["elapsed_ms"] >= 5
    with pytest.raises(HandlerError) as ei:
        W.handle(Event(memoryview(b'{"memory_mb": -1}'), Context("w", "i", "x", 1e12)))
    assert ei.value.status == 400 and "memory_mb" in str(ei.value)


def test_cli_replay_end_to_end_against_the_gateway(gw, tmp_path):
    """`hearth replay` in a subprocess against the real gateway (trace functions f0, f1, f2)."""
    gw.deploy("f0", "f1", "f2")
    before = gw.snapshot(["f0", "f1", "f2"])
    p = _replay(
        gw,
        _small_trace(tmp_path, 200),
        "--out",
        str(tmp_path / "rec.parquet"),
        "--schedule-out",
        str(tmp_path / "sched.parquet"),
        "--no-progress",
        "--shards",
        "2",
    )
    assert p.returncode == 0, p.stderr
    assert "sent 200" in p.stdout
    rec = pl.read_parquet(tmp_path / "rec.parquet")
    assert rec.height == 200 and rec["cold"].sum() == 3 and (rec["status"] == 200).all()
    _agrees_with_gateway(gw, rec, before)
    assert SC.Schedule.read(tmp_path / "sched.parquet").invocations == 200


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("app,func,end_timestamp,duration\na,f,notanumber,0.1\n")
    err = _one_error_line(_hearth("replay", str(bad), "--plan-only"))
    assert "line 2" in err and "end_timestamp" in err
    assert "no cold-start table" in _one_error_line(_hearth("coldstarts", "analyze", str(bad)))


async def test_demo_replay_helper_against_the_gateway(gw, tmp_path):
    from hearth.functions.replay import demo

    gw.deploy("workload")
    before = gw.snapshot(["workload"])
    sched = demo.demo_schedule(rate=30, seconds=3)
    assert 30 <= sched.invocations <= 200
    summary = await asyncio.to_thread(demo.demo_replay, gw.url, "workload", tmp_path, None, 30, 3)
    assert summary["replay"]["invocations"] == sched.invocations
    assert summary["replay"]["ok"] == sched.invocations
    assert (tmp_path / "records.csv").exists() and (tmp_path / "schedule.parquet").exists()
    _agrees_with_gateway(gw, R.read_requests(summary["records"]), before)


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_async_invocations_record_202_and_invocation_id(gw, client):
    name = "workload"
    gw.deploy(name)
    s = SC.constant_rate(200, 0.1, function="trace-fn-y", duration_ms=2)
    res = await D.run_schedule(s.df, _cfg(gw.url, function=name, client=client, invoke_async=True))
    rec = res.records
    assert rec.height == 20 and (rec["status"] == 202).all() and res.summary["failed"] == 0
    assert rec["cold"].null_count() == 20  # not known until the result is fetched
    assert rec["invocation"].n_unique() == 20
    # every recorded invocation id is one the gateway ran: its result carries what was sent
    results = [await asyncio.to_thread(gw.result, inv) for inv in rec["invocation"]]
    assert all(r["status"] == "succeeded" for r in results), results[:3]
    assert sorted(r["result"]["seq"] for r in results) == list(range(20))
    assert {r["result"]["function"] for r in results} == {"trace-fn-y"}


def _hearth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *args], capture_output=True, text=True, timeout=120
    )


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0, p.stderr
    return p.stderr


def _small_trace(tmp_path, n: int = 20):
    trace = tmp_path / "az.csv"
    trace.write_text(
        "app,func,end_timestamp,duration\n"
        + "".join(f"a,f{i % 3},{10 + i * 0.01:.3f},0.005\n" for i in range(n))
    )
    return trace


def _replay(gw: Gateway, trace: Path, *args: str) -> subprocess.CompletedProcess:
    """`hearth replay TRACE --target <the real gateway> ARGS` in a subprocess."""
    return _hearth("replay", str(trace), *args, "--target", gw.url)


@pytest.mark.parametrize("bad_out", ["x.txt", "missing-dir/rec.parquet"])
def test_cli_bad_out_fails_before_sending(gw, tmp_path, bad_out):
    gw.deploy("f0", "f1", "f2")  # the trace's functions exist: only --out stops the run
    before = {f: gw.invocations(f) for f in ("f0", "f1", "f2")}
    p = _replay(gw, _small_trace(tmp_path), "--out", str(tmp_path / bad_out), "--no-progress")
    assert {f: gw.invocations(f) for f in before} == before  # rejected before any request
    assert "--out" in _one_error_line(p)


def test_cli_out_validation_unwritable_parent(tmp_path, monkeypatch):
    import os

    import typer
    from hearth.functions.replay import cli as C

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    with pytest.raises(typer.Exit):
        C._check_out("--out", tmp_path / "rec.parquet")


async def test_short_run_over_failure_rate_fails(gw):
    gw.deploy("half-ok")
    gw.deploy("half-bad", handler=FAIL)
    ok0, bad0 = gw.invocations("half-ok", "200"), gw.invocations("half-bad", "500")
    df = _half_failing(200, 0.1, "half-ok", "half-bad")  # 20, far below min_samples
    with pytest.raises(D.ReplayAborted, match=r"failure rate 50\.0% over all 20") as ei:
        await D.run_schedule(df, _cfg(gw.url))
    assert ei.value.records is not None and ei.value.records.height == 20
    assert gw.invocations("half-ok", "200") - ok0 == 10
    assert gw.invocations("half-bad", "500") - bad0 == 10


def test_cli_short_replay_against_dead_target_exits_1(tmp_path):
    trace = _small_trace(tmp_path, 40)
    p = _hearth(
        "replay",
        str(trace),
        "--target",
        "http://127.0.0.1:1",
        "--max-invocations",
        "20",
        "--no-progress",
        "--timeout",
        "5",
        "--out",
        str(tmp_path / "rec.parquet"),
    )
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()  # "records: PATH", then the error
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:]
    assert "--max-failure-rate" in lines[-1] and "over all 20" in lines[-1]
    assert pl.read_parquet(tmp_path / "rec.parquet").height == 20  # records still written


@pytest.mark.parametrize(
    "schedule",
    [{"t": ["x"], "function": ["f"]}, {"t": [[1]], "function": ["f"]}],
)
async def test_dispatch_polars_errors_are_400(schedule):
    ev = Event(
        memoryview(json.dumps({"target": "hearth", "schedule": schedule}).encode()),
        Context("replay-driver", "i", "x", 1e12),
        "application/json",
    )
    with pytest.raises(HandlerError) as ei:
        await H.dispatch(ev)
    assert ei.value.status == 400 and "schedule" in str(ei.value)


@pytest.mark.parametrize(("opt", "value"), [("--shard-by", "colour"), ("--client", "curl")])
def test_cli_bad_shard_by_and_client_are_one_line(tmp_path, opt, value):
    trace = _small_trace(tmp_path)
    err = _one_error_line(_hearth("replay", str(trace), "--plan-only", opt, value))
    assert opt in err and value in err
