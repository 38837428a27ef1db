"""Open-loop HTTP replay driver: send each invocation at its planned time, record what happened.

Open loop: sends never wait for responses (every invocation is its own task), so a slow target
shows up as response time, not as a slower send rate. Timing: see ``pacing``; the send time is
taken right before the request is written (raw keep-alive HTTP/1.1 client for http:// targets,
aiohttp otherwise). Records go out in the Huawei per-request columns plus Hearth's extras
(planned/sent/lag, status, cold, instance, invocation, phase): see ``records``.

Health checks (``health``) abort the run (``ReplayAborted``) when, over the last
``health_window`` sends, the p99 send lag exceeds ``max_lag_ms`` or the failure rate exceeds
``max_failure_rate`` (checked once ``min_samples`` have been sent). A run that completes is
checked once more over all its responses, whatever their number: above ``max_failure_rate`` it
also ends in ``ReplayAborted``.

Here: the configuration, the plan (pure: order, targets, bodies), the sender (I/O), and
running several shards on one clock.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import polars as pl

from .health import final_failure_check, recent_lag_p99, running_check
from .pacing import fewer_gc_passes, wait_until
from .rawhttp import RawClient
from .records import Recorder, build_records, summarize, write_records

__all__ = [  # summarize, write_records and final_failure_check were defined here: importers keep them
    "DEFAULT_GATEWAY",
    "Clock",
    "DriverConfig",
    "Plan",
    "ReplayAborted",
    "ReplayResult",
    "dispatch_via_function",
    "final_failure_check",
    "hearth_name",
    "plan",
    "replay",
    "run_schedule",
    "run_shards",
    "summarize",
    "url_for",
    "write_records",
]

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


@dataclass
class Plan:
    """What will be sent, decided before the first send: the schedule in time order and, per
    invocation, its Hearth function name and its JSON body."""

    t: np.ndarray  # planned offsets (s), ascending
    trace_functions: list[str]
    names: list[str]  # the Hearth function each invocation goes to
    seq: np.ndarray
    phase: list
    bodies: list[bytes]
    urls: dict[str, str]  # per Hearth function name
    headers: dict[str, str]

    @property
    def n(self) -> int:
        return len(self.names)


def plan(df: pl.DataFrame, cfg: DriverConfig) -> Plan:
    """The invocations of schedule ``df`` in time order (stable), each with its target and body."""
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
    return Plan(
        t=t_plan,
        trace_functions=fn_trace,
        names=names,
        seq=seq,
        phase=phase,
        bodies=bodies,
        urls={nm: url_for(cfg, nm) for nm in set(names)},
        headers={"Content-Type": "application/json", **cfg.headers},
    )


@dataclass(frozen=True)
class Clock:
    """The run's time origin: ``t0`` on the ``perf_counter`` clock is schedule time 0;
    ``wall0``/``perf0`` were read together, to turn send times into epoch seconds."""

    t0: float
    wall0: float
    perf0: float

    @classmethod
    def start(cls, start_at: float | None) -> Clock:
        """Schedule time 0 at epoch ``start_at`` (shards share it), else 50 ms from now."""
        wall0, perf0 = time.time(), time.perf_counter()
        t0 = perf0 + (start_at - wall0) if start_at is not None else perf0 + 0.05
        return cls(t0, wall0, perf0)


async def run_schedule(df: pl.DataFrame, cfg: DriverConfig) -> ReplayResult:
    """Replay ``df`` (schedule columns) against ``cfg.target``."""
    p = plan(df, cfg)
    rec = Recorder(p.n)
    with fewer_gc_passes():
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=False)
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        clock = Clock.start(cfg.start_at)
        raw = _raw_client(cfg, p.urls, p.headers)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=p.headers
        ) as session:
            abort = await _Sender(p, rec, cfg, clock.t0, raw, session).run()
        if raw is not None:
            raw.close()
    records = build_records(p, rec, clock, cfg)
    if abort:
        raise ReplayAborted(f"replay aborted: {abort}", records)
    summary = summarize(records)
    # new connections: an open-loop HTTP/1.1 sender opens one per request in flight, so slow
    # answers multiply them (and their connect cost at the server)
    summary["connections_opened"] = raw.opened if raw is not None else None
    why = final_failure_check(summary, cfg.max_failure_rate, records)
    if why:
        raise ReplayAborted(f"replay failed: {why}", records)
    return ReplayResult(records, summary)


class _Sender:
    """One run's I/O: the send loop, one task per invocation awaiting its answer, and a monitor
    that applies the running health check and updates the progress bar."""

    def __init__(self, p: Plan, rec: Recorder, cfg: DriverConfig, t0: float, raw, session):
        self.p, self.rec, self.cfg, self.raw, self.session = p, rec, cfg, raw, session
        self.due = t0 + p.t  # planned send instants on the perf_counter clock
        self.paths = {nm: _path(u) for nm, u in p.urls.items()}
        self.abort: list[str] = []
        self.pending: set[asyncio.Task] = set()

    async def run(self) -> str | None:
        """Send everything (or until a health check fails), wait for the answers; the reason
        the run was aborted, or None."""
        progress = _Progress.start(self.p.n) if self.cfg.progress and self.p.n else None
        mon = asyncio.create_task(self.monitor(progress))
        try:
            await self.send_all()
            # wait for in-flight responses, still watching health
            while self.pending and not self.abort:
                await asyncio.wait(set(self.pending), timeout=0.25)
        finally:
            mon.cancel()
            if self.abort:
                for t in list(self.pending):
                    t.cancel()
                await asyncio.gather(*self.pending, return_exceptions=True)
            if progress is not None:
                progress.stop(self.rec.nsent)
        return self.abort[0] if self.abort else None

    async def send_all(self) -> None:
        """Each invocation at its planned instant, without waiting for earlier answers."""
        p, rec, raw, paths, due, abort, pending = (
            self.p,
            self.rec,
            self.raw,
            self.paths,
            self.due,
            self.abort,
            self.pending,
        )
        busy = self.cfg.busy_wait_us / 1e6
        naive = self.cfg.pacing == "sleep"
        loop = asyncio.get_running_loop()
        for i in range(p.n):
            if abort:
                break
            await wait_until(due[i], busy, naive)
            handle = None
            if raw is not None:  # write now on an idle connection: the send time is exact
                rec.sent[i] = time.perf_counter()
                handle = raw.send_now(paths[p.names[i]], p.bodies[i])
            task = loop.create_task(self.answer(i, handle))
            rec.order.append(i)
            rec.nsent += 1
            pending.add(task)
            task.add_done_callback(pending.discard)
            if i % 64 == 63:
                await asyncio.sleep(0)

    async def answer(self, i: int, handle=None) -> None:
        """Send invocation ``i`` unless the send loop wrote it already (``handle``), and record
        its answer, or its failure."""
        rec, p, raw = self.rec, self.p, self.raw
        if handle is None:
            rec.sent[i] = time.perf_counter()
        try:
            if handle is not None:  # already written by the send loop
                status, h, rb = await raw.finish(
                    handle, self.paths[p.names[i]], p.bodies[i], self.cfg.timeout_s
                )
                rec.response(i, status, h, rb)
            elif raw is not None:
                status, h, rb = await raw.post(
                    self.paths[p.names[i]], p.bodies[i], self.cfg.timeout_s
                )
                rec.response(i, status, h, rb)
            else:
                async with self.session.post(p.urls[p.names[i]], data=p.bodies[i]) as resp:
                    rb = await resp.read()
                    rec.response(i, resp.status, resp.headers, rb)  # CIMultiDict: any case
        except asyncio.CancelledError:
            rec.error[i] = "cancelled (replay aborted)"
            raise
        except Exception as e:  # noqa: BLE001 - every failure is a recorded outcome
            rec.failure(i, e)
        finally:
            rec.done[i] = time.perf_counter()
            rec.ndone += 1

    async def monitor(self, progress: _Progress | None) -> None:
        rec = self.rec
        while True:
            await asyncio.sleep(0.25)
            why = running_check(rec, self.due, self.cfg)
            if why:
                self.abort.append(why)
                return
            if progress is not None:
                progress.update(rec, recent_lag_p99(rec, self.due, 500))


class _Progress:
    """The terminal progress bar (rich, imported only when shown)."""

    def __init__(self, bar, task) -> None:
        self.bar, self.task = bar, task

    @classmethod
    def start(cls, n: int) -> _Progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("replay"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} sent"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        task = bar.add_task("replay", total=n, info="")
        bar.start()
        return cls(bar, task)

    def update(self, rec: Recorder, lag_p99: float) -> None:
        self.bar.update(
            self.task,
            completed=rec.nsent,
            info=f"done {rec.ndone:,} fail {rec.nfail:,} lag p99 {lag_p99:.2f} ms",
        )

    def stop(self, sent: int) -> None:
        self.bar.update(self.task, completed=sent)
        self.bar.stop()


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
