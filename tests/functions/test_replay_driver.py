"""Open-loop driver against a real loopback aiohttp server; workload and driver handlers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from aiohttp import web
from hearth.functions.replay import driver as D
from hearth.functions.replay import handlers as H
from hearth.functions.replay import readers as R
from hearth.functions.replay import schedule as SC
from hearth.functions.replay import workload as W
from hearth.sdk import Context, Event, HandlerError


class FakeGateway:
    """A loopback HTTP server speaking the gateway's invoke route and X-Hearth-* headers: the
    first call of each function is cold on instance <fn>-1, later ones warm."""

    def __init__(self, fail_every: int = 0):
        self.calls: list[dict] = []
        self.seen: set[str] = set()
        self.fail_every = fail_every
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def invoke(self, request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        if request.query.get("async") == "1":
            body = await request.json()
            self.calls.append({"name": tail[: -len(":invoke")], "async": True, **body})
            return web.json_response(
                {"invocation_id": f"a-{len(self.calls)}", "status": "pending"}, status=202
            )
        if not tail.endswith(":invoke"):
            return web.json_response({"error": "not_found", "detail": tail}, status=404)
        name = tail[: -len(":invoke")]
        body = await request.json()
        self.calls.append({"name": name, **body})
        n = len(self.calls)
        if self.fail_every and n % self.fail_every == 0:
            return web.json_response({"error": "boom", "detail": "injected"}, status=500)
        cold = name not in self.seen
        self.seen.add(name)
        return web.json_response(
            {"ok": True},
            headers={
                "X-Hearth-Cold": "1" if cold else "0",
                "X-Hearth-Instance": f"{name}-1",
                "X-Hearth-Invocation": f"inv-{n}",
            },
        )

    async def __aenter__(self):
        app = web.Application()
        app.router.add_post("/v1/functions/{tail}", self.invoke)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def _cfg(url: str, **kw) -> D.DriverConfig:
    # the server shares this process's event loop: no lag threshold unless a test sets one
    kw.setdefault("max_lag_ms", 1e6)
    return D.DriverConfig(target=url, progress=False, **kw)


async def test_replay_sends_everything_in_order_and_records_outcomes(tmp_path):
    s = SC.build(
        SC.Source(
            exact=pl.DataFrame({"function": ["Fn_A", "fn-b"] * 150, "t": np.arange(300) * 0.002}),
            kind="t",
        ),
        SC.ScheduleParams(),
    )
    async with FakeGateway() as gw:
        res = await D.run_schedule(s.df, _cfg(gw.url))
    rec = res.records
    assert rec.height == 300 and len(gw.calls) == 300
    assert {c["name"] for c in gw.calls} == {"fn-a", "fn-b"}  # trace names made DNS-safe
    assert sorted(c["seq"] for c in gw.calls) == list(range(300))
    assert (rec["status"] == 200).all()
    # cold/warm from X-Hearth-Cold: exactly one cold per function
    assert rec["cold"].sum() == 2
    assert rec.filter(pl.col("cold"))["funcName"].sort().to_list() == ["fn-a", "fn-b"]
    assert set(rec["instance"].unique().to_list()) == {"fn-a-1", "fn-b-1"}
    assert rec["requestID"].str.starts_with("inv-").all()
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
async def test_single_function_routing_puts_trace_function_in_body(client):
    s = SC.constant_rate(500, 0.2, function="trace-fn-x", duration_ms=3)
    async with FakeGateway() as gw:
        res = await D.run_schedule(s.df, _cfg(gw.url, function="replay-workload", client=client))
    assert res.records["cold"].to_list() == [True] + [False] * 99
    assert {c["name"] for c in gw.calls} == {"replay-workload"}
    assert {c["function"] for c in gw.calls} == {"trace-fn-x"}
    assert all(c["duration_ms"] == 3 for c in gw.calls)
    assert res.records["trace_function"].unique().to_list() == ["trace-fn-x"]


async def test_failure_rate_health_check_aborts():
    s = SC.constant_rate(500, 4.0)
    async with FakeGateway(fail_every=2) as gw:
        with pytest.raises(D.ReplayAborted, match=r"failure rate [3-6]\d\.\d% .* exceeds") as ei:
            await D.run_schedule(s.df, _cfg(gw.url, min_samples=100, health_window=400))
    assert ei.value.records is not None
    assert len(gw.calls) < 2000  # stopped early


async def test_lag_health_check_aborts():
    # 4000 invocations all planned at t=0: nobody can send them within 1 ms
    df = pl.DataFrame({"seq": np.arange(4000), "t": np.zeros(4000), "function": ["f"] * 4000})
    async with FakeGateway() as gw:
        with pytest.raises(D.ReplayAborted, match=r"send lag p99 .* exceeds --max-lag-ms 1"):
            await D.run_schedule(
                df, _cfg(gw.url, max_lag_ms=1.0, min_samples=200, health_window=500)
            )


async def test_unreachable_target_is_a_recorded_failure():
    s = SC.constant_rate(100, 0.1)
    res = await D.run_schedule(
        s.df, _cfg("http://127.0.0.1:9", min_samples=10_000, timeout_s=2, max_failure_rate=1.0)
    )
    assert (res.records["status"] == 0).all()
    assert res.records["error"].str.contains("Connect").all()


async def test_dispatch_handler_replays_a_shard():
    s = SC.constant_rate(400, 0.25, function="f")
    shard = SC.shard(s, 2, by="time")[1]
    async with FakeGateway() as gw:
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
    assert out["summary"]["invocations"] == shard.invocations == len(gw.calls)
    assert len(out["records"]["lag_s"]) == shard.invocations
    bad = Event(
        memoryview(b'{"target": "x"}'), Context("replay-driver", "i", "x", 1e12), "application/json"
    )
    with pytest.raises(HandlerError, match="schedule"):
        await H.dispatch(bad)


async def test_local_shards_share_one_clock():
    s = SC.constant_rate(1000, 0.3, function="f")
    async with FakeGateway() as gw:
        res = await D.run_shards([p.df for p in SC.shard(s, 3, by="time")], _cfg(gw.url))
    assert res.records.height == 300 == len(gw.calls)
    assert res.records["planned_s"].is_sorted()


def test_workload_busy_sleep_and_allocate():
    out = W.run_work(20, 8, "busy")
    assert out["elapsed_ms"] >= 20 and out["memory_mb"] == 8
    assert W.run_work(10, 0, "sleep")["elapsed_ms"] >= 10
    assert W.run_work(50, 0, "busy", deadline_s=0.02)["elapsed_ms"] < 50  # capped by deadline
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


def test_cli_replay_end_to_end_against_loopback(tmp_path):
    """`hearth replay` in a subprocess against a loopback server run by this test."""
    p, calls = _replay_against_fake_gateway(
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
    assert calls == 200 and "sent 200" in p.stdout
    rec = pl.read_parquet(tmp_path / "rec.parquet")
    assert rec.height == 200 and rec["cold"].sum() == 3
    assert SC.Schedule.read(tmp_path / "sched.parquet").invocations == 200


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("app,func,end_timestamp,duration\na,f,notanumber,0.1\n")
    err = _one_error_line(_hearth("replay", str(bad), "--plan-only"))
    assert "line 2" in err and "end_timestamp" in err
    assert "no cold-start table" in _one_error_line(_hearth("coldstarts", "analyze", str(bad)))


async def test_demo_replay_helper_against_loopback(tmp_path):
    from hearth.functions.replay import demo

    sched = demo.demo_schedule(rate=30, seconds=3)
    assert 30 <= sched.invocations <= 200
    async with FakeGateway() as gw:
        summary = await asyncio.to_thread(
            demo.demo_replay, gw.url, "replay-workload", tmp_path, None, 30, 3
        )
    assert summary["replay"]["invocations"] == sched.invocations == len(gw.calls)
    assert {c["name"] for c in gw.calls} == {"replay-workload"}
    assert (tmp_path / "records.csv").exists() and (tmp_path / "schedule.parquet").exists()


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_async_invocations_record_202_and_invocation_id(client):
    s = SC.constant_rate(200, 0.1, function="f")
    async with FakeGateway() as gw:
        res = await D.run_schedule(s.df, _cfg(gw.url, client=client, invoke_async=True))
    assert all(c["async"] for c in gw.calls) and len(gw.calls) == 20
    assert (res.records["status"] == 202).all() and res.summary["failed"] == 0
    assert res.records["invocation"].str.starts_with("a-").all()
    assert res.records["cold"].null_count() == 20  # not known until the result is fetched


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


def _replay_against_fake_gateway(
    trace: Path, *args: str
) -> tuple[subprocess.CompletedProcess, int]:
    """`hearth replay TRACE --target <FakeGateway> ARGS` in a subprocess; returns the finished
    process and the calls the gateway received. The gateway runs on this test's event loop, so
    the CLI must run without blocking it."""
    cmd = [sys.executable, "-m", "hearth.cli", "replay", str(trace), *args]

    async def main():
        async with FakeGateway() as gw:
            proc = await asyncio.create_subprocess_exec(
                *cmd, "--target", gw.url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await proc.communicate()
            done = subprocess.CompletedProcess(cmd, proc.returncode, out.decode(), err.decode())
            return done, len(gw.calls)

    return asyncio.run(main())


@pytest.mark.parametrize("bad_out", ["x.txt", "missing-dir/rec.parquet"])
def test_cli_bad_out_fails_before_sending(tmp_path, bad_out):
    p, calls = _replay_against_fake_gateway(
        _small_trace(tmp_path), "--out", str(tmp_path / bad_out), "--no-progress"
    )
    assert calls == 0  # rejected before any request
    assert "--out" in _one_error_line(p)


def test_cli_out_validation_unwritable_parent(tmp_path, monkeypatch):
    import os

    import typer
    from hearth.functions.replay import cli as C

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    with pytest.raises(typer.Exit):
        C._check_out("--out", tmp_path / "rec.parquet")


def test_replay_cmd_uses_the_module_guard():
    import inspect

    from hearth.functions.replay import cli as C

    assert hasattr(C.replay_cmd, "__wrapped__")  # decorated with @_guard
    src = inspect.getsource(C.replay_cmd.__wrapped__)
    assert "TraceFormatError" not in src and "AnalysisError" not in src


async def test_short_run_over_failure_rate_fails():
    s = SC.constant_rate(200, 0.1, function="f")  # 20 invocations, far below min_samples
    async with FakeGateway(fail_every=2) as gw:
        with pytest.raises(D.ReplayAborted, match=r"failure rate 50\.0% over all 20") as ei:
            await D.run_schedule(s.df, _cfg(gw.url))
    assert ei.value.records is not None and ei.value.records.height == 20
    assert len(gw.calls) == 20


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
