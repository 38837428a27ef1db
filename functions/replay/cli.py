"""CLI for traces, cold-start analysis and replay: ``hearth trace``, ``hearth coldstarts``,
``hearth replay``. Errors print one ``error: ...`` line and exit 1."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from hearth.cli_errors import fail as _fail
from hearth.cli_errors import guard

if TYPE_CHECKING:
    import polars as pl

    from .driver import DriverConfig, ReplayResult
    from .schedule import Schedule, ScheduleParams

trace_app = typer.Typer(
    help="Read, validate and synthesise serverless traces.", no_args_is_help=True
)
coldstarts_app = typer.Typer(
    help="Analyse cold-start traces and simulate keep-alive policies.", no_args_is_help=True
)


def _errors() -> tuple[type[BaseException], ...]:
    """Expected errors (bad traces, bad options) become one-line messages."""
    from .coldstart_trace import AnalysisError
    from .readers import TraceFormatError

    return (TraceFormatError, AnalysisError, ValueError, OSError)


_guard = guard(_errors)


@trace_app.command("synth")
@_guard
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (Huawei dataset layout)."),
    rows: int = typer.Option(100_000, help="Cold starts to generate (all regions)."),
    seed: int = typer.Option(0),
    regions: int = typer.Option(1, min=1, max=64),
    functions: int | None = typer.Option(
        None, help="Function population (default rows/400, >= 50)."
    ),
    fmt: str = typer.Option("csv", "--format", help="csv | csv.gz | parquet"),
    daily: bool = typer.Option(True, "--daily/--single-file", help="One file per day and region."),
    requests: bool = typer.Option(
        False, "--requests", help="Also write per-request rows and an Azure 2021 file."
    ),
    span_days: float | None = typer.Option(
        None, help="Stretch/shrink arrivals to span this many days."
    ),
    requests_per_pod: float = typer.Option(
        4.0, help="Mean requests served per pod (per-request rows)."
    ),
) -> None:
    """Write a synthetic trace following the Huawei paper's fits (labelled synthetic)."""
    from . import synth

    if fmt not in ("csv", "csv.gz", "parquet"):
        _fail(f"--format must be csv, csv.gz or parquet, not {fmt!r}")
    if rows < 2:
        _fail("--rows must be at least 2")
    p = synth.SynthParams(
        rows=rows,
        seed=seed,
        regions=regions,
        functions=functions,
        span_days=span_days,
        requests_per_pod_mean=requests_per_pod,
    )
    written = synth.write_dataset(p, out, fmt=fmt, daily=daily, with_requests=requests)
    for kind, files in written.items():
        where = os.path.commonpath([Path(f).parent for f in files])  # all regions' directory
        typer.echo(f"{kind}: {len(files)} file(s) under {where}")


@trace_app.command("info")
@_guard
def info_cmd(
    paths: list[Path] = typer.Argument(..., help="Trace files or directories."),
    kind: str | None = typer.Option(None, help="Force a kind instead of detecting it."),
    as_json: bool = typer.Option(False, "--json"),
    strict: bool = typer.Option(
        False, "--strict", help="Unrecognised files in a directory are errors."
    ),
) -> None:
    """Detect kinds, validate every file fully (types, identity) and summarise."""
    from . import readers as R
    from . import synth

    out = []
    skipped: list[str] = []
    if kind is not None:
        by_kind: dict[str, list] = {}
        for f in R.inspect_all(paths, kind):
            by_kind.setdefault(f.kind, []).append(f)
    else:  # unknown files inside a directory are listed, not fatal (unless --strict)
        by_kind = R.classify(paths, skipped=None if strict else skipped)
    for k, fs in by_kind.items():
        df = R.load(fs)
        entry = {
            "kind": k,
            "files": len(fs),
            "rows": df.height,
            "columns": df.columns[:8] + (["..."] if df.width > 8 else []),
        }
        if k == "huawei-coldstart":
            entry["identity"] = R.check_identity(df).to_dict()
            entry["identity"].pop("examples")
        label = synth.read_label(fs[0].path)
        entry["synthetic"] = bool(label and label.get("synthetic"))
        out.append(entry)
    for msg in skipped:
        typer.echo(f"skipped: {msg}", err=True)
    if as_json:
        typer.echo(json.dumps(out))
        return
    for e in out:
        extra = ""
        if "identity" in e:
            extra = f", identity violations {e['identity']['violations']}"
        syn = " (synthetic)" if e["synthetic"] else ""
        typer.echo(f"{e['kind']}{syn}: {e['files']} file(s), {e['rows']:,} rows{extra}")


trace_app.command("validate")(info_cmd)


@coldstarts_app.command("analyze")
@_guard
def analyze_cmd(
    paths: list[Path] = typer.Argument(
        ..., help="Cold-start tables (+ runtime table, per-request rows)."
    ),
    out: Path = typer.Option(Path("coldstart-report"), "--out", "-o"),
    compare: bool = typer.Option(
        False, "--compare", help="Each PATH is a separate trace, side by side."
    ),
    label: list[str] = typer.Option(None, "--label", help="Labels for the traces (repeat)."),
    seed: int = typer.Option(0),
) -> None:
    """HTML report (PNG figures) + stats.json after the Huawei cold-start analyses."""
    from . import analyze

    groups = [[p] for p in paths] if compare else [list(paths)]
    if label and len(label) != len(groups):
        _fail(f"--label given {len(label)} times for {len(groups)} trace(s)")
    doc = analyze.run(groups, out, seed=seed, labels=label or None)
    for t in doc["traces"]:
        o = t["core"]["overall"]
        f = t["fit_coldstart_lognormal"]
        fit = (  # a trace too small to fit (a node's own export of a few calls) says so
            f"LogNormal fit: {f['error']}"
            if "error" in f
            else f"LogNormal fit mean {f['mean']:.2f}s sd {f['sd']:.2f}s "
            f"(KS vs published {f['ks_vs_published']:.3f})"
        )
        typer.echo(
            f"{t['label']}: {o['count']:,} cold starts, mean {o['mean']:.3f}s, "
            f"p99 {o['p99']:.3f}s; {fit}"
        )
    typer.echo(f"report: {out / 'report.html'}")


@coldstarts_app.command("simulate")
@_guard
def simulate_cmd(
    trace: list[Path] = typer.Argument(..., help="A trace with arrivals (any readable kind)."),
    policy: list[str] = typer.Option(
        None, "--policy", help="Keep-alive policies (repeat); default all."
    ),
    out: Path = typer.Option(Path("keepalive-sim"), "--out", "-o"),
    memory_mb: float = typer.Option(256.0),
    cold_start_s: float | None = typer.Option(
        None, help="Default: the trace's mean cold-start time, else 1s."
    ),
    exec_s: float = typer.Option(0.1),
    window_s: float | None = typer.Option(None, help="Only the first N seconds of the trace."),
    max_functions: int | None = typer.Option(
        None, help="Sample at most this many functions (seeded)."
    ),
    seed: int = typer.Option(0),
) -> None:
    """Replay a trace's arrivals offline against the controller's keep-alive policies."""
    from . import simulate

    res = simulate.run(
        trace,
        out,
        policies=policy or None,
        memory_mb=memory_mb,
        cold_start_s=cold_start_s,
        exec_s=exec_s,
        window_s=window_s,
        max_functions=max_functions,
        seed=seed,
    )
    typer.echo(
        f"{'policy':<22}{'invocations':>12}{'cold starts':>12}{'cold %':>9}{'idle GB-s':>12}"
    )
    for r in res["results"]:
        typer.echo(
            f"{r['policy']:<22}{r['invocations']:>12,}{r['cold_starts']:>12,}"
            f"{r['cold_start_pct']:>9.2f}{r['idle_memory_gb_s']:>12.1f}"
        )
    typer.echo(f"pareto plot: {out / 'pareto.png'}")


RECORD_SUFFIXES = (".parquet", ".pq", ".csv")  # what driver.write_records / Schedule.write take


def _check_suffix(opt: str, path: Path) -> None:
    if not path.name.endswith(RECORD_SUFFIXES):
        _fail(f"{opt} {path}: must end in .parquet or .csv")


def _check_out(opt: str, path: Path) -> None:
    """A bad output path fails before anything is sent: a known suffix, an existing and
    writable parent directory."""
    import os

    _check_suffix(opt, path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        _fail(f"{opt} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"{opt} {path}: directory {parent} is not writable")
    if path.is_dir():
        _fail(f"{opt} {path}: is a directory")


@_guard
def replay_cmd(
    trace: list[Path] = typer.Argument(
        ..., help="Trace files/directories, or a schedule (.parquet/.csv) from --schedule-out."
    ),
    target: str = typer.Option(
        "hearth", help="'hearth' (local gateway :8080), a base URL, or a URL with {function}."
    ),
    function: str | None = typer.Option(
        None,
        "--function",
        help="Send every invocation to this Hearth function (e.g. the replay workload).",
    ),
    rate_scale: float = typer.Option(
        1.0, "--rate-scale", "--speed", help="Speed factor: >1 replays faster (rate x scale)."
    ),
    target_rps: float | None = typer.Option(
        None, help="Sample functions to about this rate (InVitro-style)."
    ),
    start: float | None = typer.Option(
        None, help="Window start (trace seconds after its beginning)."
    ),
    duration: float | None = typer.Option(None, help="Window length (trace seconds)."),
    compress_idle: float | None = typer.Option(
        None, help="Shorten idle gaps longer than this (trace seconds)."
    ),
    spread: str = typer.Option(
        "exponential", help="exponential | uniform | equidistant (per-minute counts)."
    ),
    warmup: float = typer.Option(0.0, help="Warm-up phase length in seconds (Little's law)."),
    seed: int = typer.Option(0),
    max_invocations: int | None = typer.Option(None),
    out: Path = typer.Option(
        Path("replay-records.parquet"),
        "--out",
        "-o",
        help="Per-invocation records (.parquet|.csv).",
    ),
    schedule_out: Path | None = typer.Option(
        None, help="Also export the schedule (.parquet|.csv)."
    ),
    plan_only: bool = typer.Option(
        False, "--plan-only", help="Build (and export) the schedule, send nothing."
    ),
    shards: int = typer.Option(
        1, min=1, help="Cut the schedule into shards (by function or time)."
    ),
    shard_by: str = typer.Option("function", help="function | time"),
    via_function: str | None = typer.Option(
        None, help="Dispatch shards to this replay-driver function on Hearth."
    ),
    max_lag_ms: float = typer.Option(50.0, help="Abort when send-lag p99 exceeds this."),
    max_failure_rate: float = typer.Option(0.05, help="Abort when the failure rate exceeds this."),
    timeout: float = typer.Option(60.0, help="Per-request timeout (s)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    client: str = typer.Option("auto", help="auto | raw (keep-alive HTTP/1.1) | aiohttp"),
    invoke_async: bool = typer.Option(
        False, "--async", help="Async invocations (202 + invocation id)."
    ),
) -> None:
    """Replay a trace (or a schedule) against Hearth or any HTTP endpoint, open loop."""
    from . import driver as D
    from . import schedule as SC

    _check_replay_args(shard_by, client, plan_only, out, schedule_out)
    params = SC.ScheduleParams(
        seed=seed,
        spread=spread,
        speed=rate_scale,
        start_s=start,
        duration_s=duration,
        compress_idle_s=compress_idle,
        target_rps=target_rps,
        warmup_s=warmup,
        max_invocations=max_invocations,
    )
    sched = _schedule_for(trace, params, schedule_out, plan_only)
    if plan_only:
        return
    if sched.invocations == 0:
        _fail("the schedule is empty (check --start/--duration/--target-rps)")
    cfg = D.DriverConfig(
        target=target,
        function=function,
        timeout_s=timeout,
        max_lag_ms=max_lag_ms,
        max_failure_rate=max_failure_rate,
        progress=progress,
        client=client,
        invoke_async=invoke_async,
    )
    res = _send([s.df for s in SC.shard(sched, shards, by=shard_by)], cfg, via_function, out)
    D.write_records(res.records, out)
    _echo_summary(res.summary)
    typer.echo(f"records: {out}")


def _check_replay_args(
    shard_by: str, client: str, plan_only: bool, out: Path, schedule_out: Path | None
) -> None:
    """Bad choices and output paths fail before a trace is read."""
    if shard_by not in ("function", "time"):
        _fail(f"--shard-by must be function or time, not {shard_by!r}")
    if client not in ("auto", "raw", "aiohttp"):
        _fail(f"--client must be auto, raw or aiohttp, not {client!r}")
    if not plan_only:
        _check_out("--out", out)
    if schedule_out is not None:  # its directory is created if missing, as before
        _check_suffix("--schedule-out", schedule_out)


def _schedule_for(
    trace: list[Path], params: ScheduleParams, schedule_out: Path | None, plan_only: bool
) -> Schedule:
    """The schedule to replay: read back if ``trace`` is one, else built from the trace files
    with ``params``; exported to ``schedule_out`` if given, its size printed."""
    from . import schedule as SC

    if len(trace) == 1 and SC.is_schedule(trace[0]):
        sched = SC.Schedule.read(trace[0])
    else:
        sched = SC.build_from_paths(list(trace), params)
        _note_unmet_target(sched.meta.get("sampling"), params)
    if schedule_out:
        sched.write(schedule_out)
        typer.echo(
            f"schedule: {sched.invocations:,} invocations over {sched.meta.get('duration_s', 0):.1f}s -> {schedule_out}"
        )
    if plan_only and not schedule_out:
        typer.echo(
            f"schedule: {sched.invocations:,} invocations, {sched.meta.get('functions', '?')} functions"
        )
    return sched


def _note_unmet_target(sampling: dict | None, params: ScheduleParams) -> None:
    """--target-rps above the trace's own rate keeps every function (sampling only removes
    some): say so, else the achieved rate looks like a failure to reach the target."""
    if not sampling or sampling.get("sampled_rate") != sampling.get("trace_rate"):
        return
    if sampling["target_rate"] <= sampling["trace_rate"]:
        return
    typer.echo(
        f"note: --target-rps {params.target_rps:g} is above the trace's "
        f"{sampling['trace_rate'] * params.speed:.1f}/s in the window: every function is "
        "replayed (--rate-scale replays faster)",
        err=True,
    )


def _send(
    parts: list[pl.DataFrame], cfg: DriverConfig, via_function: str | None, out: Path
) -> ReplayResult:
    """Replay the shards: through replay-driver instances on Hearth (``via_function``), several
    in this process on one clock, or one. A replay that aborts still writes the records it
    has to ``out``, then fails."""
    import asyncio

    from . import driver as D

    try:
        if via_function:
            return asyncio.run(D.dispatch_via_function(parts, cfg, via_function, cfg.base_url()))
        if len(parts) > 1:
            return asyncio.run(D.run_shards(parts, cfg))
        return D.replay(parts[0], cfg)
    except D.ReplayAborted as e:
        if e.records is not None and e.records.height:
            D.write_records(e.records, out)
            typer.echo(f"records: {out}", err=True)
        _fail(str(e))


def _echo_summary(s: dict) -> None:
    typer.echo(
        f"sent {s['invocations']:,} ({s['ok']:,} ok, {s['failed']:,} failed); planned {s['planned_rate']:.1f}/s, "
        f"achieved {s['achieved_rate']:.1f}/s; lag p50 {s['lag_ms_p50']:.3f} ms p99 {s['lag_ms_p99']:.3f} ms "
        f"max {s['lag_ms_max']:.3f} ms; cold {s['cold']:,} warm {s['warm']:,}"
    )
