"""Open-loop HTTP replay driver: send each invocation at its planned time, record what happened.

Open loop: sends never wait for responses (every invocation is its own task), so a slow target
shows up as response time, not as a slower send rate. Timing: an event-loop sleep until ~1.5 ms
before the planned time (loop timers are ~1 ms grained), then a blocking ``time.sleep`` until
``busy_wait_us`` before it (the process is not runnable, so no CPU is burnt and responses are
handled at the next loop pass), then a spin; the send time is taken right before the request is
written (raw keep-alive HTTP/1.1 client for http:// targets, aiohttp otherwise). Records go out in the Huawei per-request columns plus
Hearth's extras (planned/sent/lag, status, cold, instance, invocation, phase).

Health checks abort the run (``ReplayAborted``) when, over the last ``health_window`` sends, the
p99 send lag exceeds ``max_lag_ms`` or the failure rate exceeds ``max_failure_rate`` (checked
once ``min_samples`` have been sent). A run that completes is checked once more over all its
responses, whatever their number: above ``max_failure_rate`` it also ends in ``ReplayAborted``.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import asyncio
import gc
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import polars as pl

from .rawhttp import RawClient

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class ReplayAborted(RuntimeError):
    """A health check failed; the message says which threshold and the observed value."""

    def __init__(self, message: str, records: pl.DataFrame | None = None):
        super().__init__(message)
        self.records = records


@dataclass
class DriverConfig:
    target: str = (
        "hearth"  # "hearth" (local gateway), a base URL, or a URL template with {function}
    )
    function: str | None = None  # send everything to this Hearth function (trace function in body)
    timeout_s: float = 60.0
    max_lag_ms: float = 50.0
    max_failure_rate: float = 0.05
    health_window: int = 2000
    min_samples: int = 200
    busy_wait_us: float = 150.0
    pacing: str = "precise"  # precise: sleep, yield, spin | sleep: asyncio.sleep only (naive)
    invoke_async: bool = False  # async invocations (?async=1 -> 202 + invocation id)
    client: str = "auto"  # auto: raw keep-alive HTTP/1.1 for http:// | raw | aiohttp
    progress: bool = True
    start_at: float | None = None  # epoch seconds; shards started by one `hearth replay` share it
    cluster: str = "local"
    user: str = "default"  # same userID as Hearth's own cold-start export
    headers: dict[str, str] = field(default_factory=dict)

    def base_url(self) -> str:
        return DEFAULT_GATEWAY if self.target == "hearth" else self.target.rstrip("/")


_NAME_RE = re.compile(r"[^a-z0-9-]+")


def hearth_name(trace_function: str) -> str:
    """A DNS-1123 function name for a trace function id (hashes, 'a---b---pool')."""
    s = _NAME_RE.sub("-", trace_function.lower()).strip("-")
    s = ("f-" + s) if not s or not s[0].isalpha() else s
    return s[:63].rstrip("-")


def url_for(cfg: DriverConfig, name: str) -> str:
    base = cfg.base_url()
    url = (
        base.replace("{function}", name)
        if "{function}" in base
        else f"{base}/v1/functions/{name}:invoke"
    )
    if cfg.invoke_async:  # the gateway answers 202 + invocation id; the work runs from its queue
        url += ("&" if "?" in url else "?") + "async=1"
    return url


@dataclass
class ReplayResult:
    records: pl.DataFrame
    summary: dict


class _Recorder:
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


async def run_schedule(df: pl.DataFrame, cfg: DriverConfig) -> ReplayResult:
    """Replay ``df`` (schedule columns) against ``cfg.target``."""
    n = df.height
    t_plan = df["t"].to_numpy().astype(float)
    if n and np.any(np.diff(t_plan) < 0):
        order = np.argsort(t_plan, kind="stable")
        df = df[order]
        t_plan = t_plan[order]
    fn_trace = df["function"].cast(pl.String).to_list()
    names = [cfg.function] * n if cfg.function else [hearth_name(f) for f in fn_trace]
    dur = df["duration_ms"].to_numpy() if "duration_ms" in df.columns else np.zeros(n)
    mem = df["memory_mb"].to_numpy() if "memory_mb" in df.columns else np.zeros(n)
    seq = df["seq"].to_numpy() if "seq" in df.columns else np.arange(n)
    phase = df["phase"].to_list() if "phase" in df.columns else ["main"] * n
    rec = _Recorder(n)
    urls = {nm: url_for(cfg, nm) for nm in set(names)}
    headers = {"Content-Type": "application/json", **cfg.headers}
    bodies = [
        json.dumps(
            {
                "function": fn_trace[i],
                "duration_ms": float(dur[i]),
                "memory_mb": float(mem[i]),
                "seq": int(seq[i]),
            },
            separators=(",", ":"),
        ).encode()
        for i in range(n)
    ]
    abort: list[str] = []
    pending: set[asyncio.Task] = set()

    # Fewer, later GC passes: a full collection over the records in flight is a multi-ms pause.
    gc_threshold = gc.get_threshold()
    if gc_threshold[0] == 100_000:  # another shard in this process already raised it
        gc_threshold = (700, 10, 10)
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    wall0, perf0 = time.time(), time.perf_counter()
    if cfg.start_at is not None:
        t0 = perf0 + (cfg.start_at - wall0)
    else:
        t0 = perf0 + 0.05

    raw = _raw_client(cfg, urls, headers)
    paths = {nm: _path(u) for nm, u in urls.items()}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:

        def outcome(i: int, status: int, h, body: bytes = b"") -> None:
            rec.status[i] = status
            if status == 202 and body:
                try:
                    rec.invocation[i] = json.loads(body).get("invocation_id")
                except (ValueError, AttributeError):
                    pass
            c = h.get("x-hearth-cold")
            if c is not None:
                rec.cold[i] = 1 if c.strip() in ("1", "true", "True") else 0
            rec.instance[i] = h.get("x-hearth-instance")
            rec.invocation[i] = h.get("x-hearth-invocation") or rec.invocation[i]
            if status >= 400:
                rec.nfail += 1
                rec.error[i] = f"HTTP {status}"

        async def send(i: int, handle=None) -> None:
            if handle is None:
                rec.sent[i] = time.perf_counter()
            try:
                if handle is not None:  # already written by the sender loop
                    status, h, rb = await raw.finish(
                        handle, paths[names[i]], bodies[i], cfg.timeout_s
                    )
                    outcome(i, status, h, rb)
                elif raw is not None:
                    status, h, rb = await raw.post(paths[names[i]], bodies[i], cfg.timeout_s)
                    outcome(i, status, h, rb)
                else:
                    async with session.post(urls[names[i]], data=bodies[i]) as resp:
                        rb = await resp.read()
                        outcome(i, resp.status, resp.headers, rb)  # CIMultiDict: any case
            except asyncio.CancelledError:
                rec.error[i] = "cancelled (replay aborted)"
                raise
            except Exception as e:  # noqa: BLE001 - every failure is a recorded outcome
                rec.status[i] = 0
                rec.error[i] = f"{type(e).__name__}: {e}"[:200]
                rec.nfail += 1
            finally:
                rec.done[i] = time.perf_counter()
                rec.ndone += 1

        def health() -> str | None:
            k = rec.nsent
            if k < cfg.min_samples:
                return None
            idx = np.asarray(rec.order[-cfg.health_window :])
            lags = (rec.sent[idx] - (t0 + t_plan[idx])) * 1000.0
            p99 = float(np.nanpercentile(lags, 99))
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

        progress = None
        if cfg.progress and n:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(
                TextColumn("replay"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} sent"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            ptask = progress.add_task("replay", total=n, info="")
            progress.start()

        async def monitor() -> None:
            while True:
                await asyncio.sleep(0.25)
                why = health()
                if why:
                    abort.append(why)
                    return
                if progress is not None:
                    k = rec.nsent
                    last = np.asarray(rec.order[-500:]) if k else np.array([], int)
                    lag = (
                        float(np.nanpercentile((rec.sent[last] - (t0 + t_plan[last])) * 1000, 99))
                        if k
                        else 0.0
                    )
                    progress.update(
                        ptask,
                        completed=k,
                        info=f"done {rec.ndone:,} fail {rec.nfail:,} lag p99 {lag:.2f} ms",
                    )

        mon = asyncio.create_task(monitor())
        busy = cfg.busy_wait_us / 1e6
        naive = cfg.pacing == "sleep"
        try:
            for i in range(n):
                if abort:
                    break
                target = t0 + t_plan[i]
                now = time.perf_counter()
                if naive:
                    if target > now:
                        await asyncio.sleep(target - now)
                elif target > now:
                    # coarse: the event loop's timers are ~1 ms grained, so stop 1.5 ms early
                    if target - now > 0.002:
                        await asyncio.sleep(target - now - 0.0015)
                    else:
                        await asyncio.sleep(0)  # run ready I/O callbacks once
                    # fine: a blocking sleep (not runnable, no CPU burnt), then spin the rest
                    now = time.perf_counter()
                    if target - now > busy:
                        time.sleep(target - now - busy)
                        now = time.perf_counter()
                    while now < target:
                        now = time.perf_counter()
                handle = None
                if raw is not None:  # write now on an idle connection: the send time is exact
                    rec.sent[i] = time.perf_counter()
                    handle = raw.send_now(paths[names[i]], bodies[i])
                task = asyncio.get_running_loop().create_task(send(i, handle))
                rec.order.append(i)
                rec.nsent += 1
                pending.add(task)
                task.add_done_callback(pending.discard)
                if i % 64 == 63:
                    await asyncio.sleep(0)
            if not abort and pending:
                # wait for in-flight responses, still watching health
                while pending and not abort:
                    await asyncio.wait(set(pending), timeout=0.25)
        finally:
            mon.cancel()
            if abort:
                for t in list(pending):
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            if progress is not None:
                progress.update(ptask, completed=rec.nsent)
                progress.stop()

    if raw is not None:
        raw.close()
    gc.set_threshold(*gc_threshold)
    gc.unfreeze()
    records = _records(df, rec, t_plan, t0, wall0, perf0, names, fn_trace, bodies, phase, cfg)
    if abort:
        raise ReplayAborted(f"replay aborted: {abort[0]}", records)
    summary = summarize(records)
    # new connections: an open-loop HTTP/1.1 sender opens one per request in flight, so slow
    # answers multiply them (and their connect cost at the server)
    summary["connections_opened"] = raw.opened if raw is not None else None
    why = final_failure_check(summary, cfg.max_failure_rate, records)
    if why:
        raise ReplayAborted(f"replay failed: {why}", records)
    return ReplayResult(records, summary)


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


def _path(url: str) -> str:
    u = urlsplit(url)
    return (u.path or "/") + (f"?{u.query}" if u.query else "")


def _raw_client(cfg: DriverConfig, urls: dict[str, str], headers: dict[str, str]):
    """The fast keep-alive client when every URL is plain http on one host (else aiohttp)."""
    if cfg.client == "aiohttp":
        return None
    parts = {(urlsplit(u).scheme, urlsplit(u).netloc) for u in urls.values()}
    if len(parts) != 1 or next(iter(parts))[0] != "http":
        if cfg.client == "raw":
            raise ValueError("client 'raw' needs http:// URLs on a single host")
        return None
    scheme, netloc = next(iter(parts))
    return RawClient(f"{scheme}://{netloc}", headers)


def _records(
    df, rec, t_plan, t0, wall0, perf0, names, fn_trace, bodies, phase, cfg
) -> pl.DataFrame:
    sent_rel = rec.sent - t0
    rt = rec.done - rec.sent
    epoch_sent = wall0 + (rec.sent - perf0)
    n = len(names)
    null_f = pl.lit(None, dtype=pl.Float64)
    base = pl.DataFrame(
        {
            "time_worker": np.round(epoch_sent, 6),
            "requestID": [
                rec.invocation[i] or f"replay-{int(s)}"
                for i, s in enumerate(df["seq"].to_numpy() if "seq" in df.columns else range(n))
            ],
            "clusterName": [cfg.cluster] * n,
            "funcName": names,
            "podID": rec.instance,
            "userID": [cfg.user] * n,
            "totalCost_worker": rt,
            "requestBodySize": np.array([len(b) for b in bodies], dtype=float),
            "planned_s": t_plan,
            "sent_s": sent_rel,
            "lag_s": sent_rel - t_plan,
            "status": rec.status.astype(np.int64),
            "cold": pl.Series([None if c < 0 else bool(c) for c in rec.cold], dtype=pl.Boolean),
            "instance": rec.instance,
            "invocation": rec.invocation,
            "phase": phase,
            "trace_function": fn_trace,
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
    ).select(
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


def replay(df: pl.DataFrame, cfg: DriverConfig) -> ReplayResult:
    return asyncio.run(run_schedule(df, cfg))


async def run_shards(shards: list[pl.DataFrame], cfg: DriverConfig) -> ReplayResult:
    """Several shards in this process, started at the same instant (local sharding)."""
    import dataclasses

    start = cfg.start_at or (time.time() + 0.3)
    c = dataclasses.replace(cfg, start_at=start)
    results = await asyncio.gather(
        *[
            run_schedule(s, dataclasses.replace(c, progress=cfg.progress and i == 0))
            for i, s in enumerate(shards)
        ]
    )
    recs = pl.concat([r.records for r in results]).sort("planned_s")
    return ReplayResult(recs, summarize(recs))


async def dispatch_via_function(
    shards: list[pl.DataFrame], cfg: DriverConfig, via: str, gateway: str
) -> ReplayResult:
    """Send each shard to a replay-driver instance (the Hearth function ``via``) and merge the
    records they return. All shards share one start time a few seconds ahead."""
    start = time.time() + 3.0
    url = f"{gateway.rstrip('/')}/v1/functions/{via}:invoke"
    payloads = [
        {
            "target": cfg.target,
            "function": cfg.function,
            "start_at": start,
            "max_lag_ms": cfg.max_lag_ms,
            "max_failure_rate": cfg.max_failure_rate,
            "invoke_async": cfg.invoke_async,
            "schedule": {
                c: s[c].to_list()
                for c in ("seq", "t", "function", "duration_ms", "memory_mb", "phase")
            },
        }
        for s in shards
    ]
    span = max((float(s["t"].max()) for s in shards if s.height), default=0.0)
    timeout = aiohttp.ClientTimeout(total=span + cfg.timeout_s + 30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(p):
            async with session.post(url, json=p) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise ReplayAborted(
                        f"replay driver {via!r} answered {resp.status}: {body[:300]!r}"
                    )
                return json.loads(body)

        outs = await asyncio.gather(*[one(p) for p in payloads])
    frames = [pl.DataFrame(o["records"]) for o in outs if o.get("records")]
    aborted = [o["error"] for o in outs if o.get("error")]
    recs = pl.concat(frames, how="diagonal_relaxed").sort("planned_s") if frames else pl.DataFrame()
    if aborted:
        raise ReplayAborted(f"replay aborted in a shard: {aborted[0]}", recs)
    return ReplayResult(recs, summarize(recs))
