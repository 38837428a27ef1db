"""`hearth demo`: start Hearth on this machine, deploy example functions, invoke them over HTTP
(sync and async), show a cold start and warm reuse, a zero-copy 64 MB payload and a chained call,
and shut down cleanly. Larger steps (an FL round, a trace replay with its cold-start report) are
added by those functions' modules when present."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

from hearth.config import Settings
from hearth.demo_steps import Step, builtins_zygote_ready, zygotes_ready
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

H = "hearth.functions.examples.handlers"
# what the example handlers' module imports: the node's zygote for this list imports it once,
# and each new instance forks with it (hearth.spec: preload)
PRELOAD = ["numpy", "asyncio"]
DEMO_FUNCTIONS = [
    {
        "name": "hello",
        "handler": f"{H}:hello",
        "preload": PRELOAD,
        "concurrency": 2,
        "max_instances": 2,
        "keep_alive": {"ttl_s": 2},
    },
    {
        "name": "array-sum",
        "handler": f"{H}:array_sum",
        "preload": PRELOAD,
        "max_instances": 2,
        "keep_alive": {"ttl_s": 30},
    },
    {
        "name": "chain-sum",
        "handler": f"{H}:chain_sum",
        "preload": PRELOAD,
        "max_instances": 1,
        "keep_alive": {"ttl_s": 30},
    },
    {"name": "fail", "handler": f"{H}:fail", "preload": PRELOAD, "max_instances": 1},
    {
        "name": "orders",
        "handler": "hearth.queue.examples:record",
        "preload": ["redis"],  # what it imports (~130 ms in a new process)
        "concurrency": 4,
        "max_instances": 1,
        "keep_alive": {"ttl_s": 30},
        "triggers": [
            {
                "type": "redis-stream",
                "stream": "demo-orders",
                "batch_size": 64,
                "max_deliveries": 2,
                "backoff_s": 0.05,
            }
        ],
    },
]
QUEUE_EVENTS = 2000
# How long a step may wait for the platform's state (a result, the queue drained, scale to
# zero): many times what each takes on a quiet machine (well under 10 s), so a loaded one is
# slow, not failed; past it the demo stops with the step named.
WAIT_S = 120.0


async def _call(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    ctype: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes, float]:
    t0 = time.perf_counter()
    async with session.post(
        url, data=body, headers={"Content-Type": ctype, **(headers or {})}
    ) as r:
        data = await r.read()
        return r.status, dict(r.headers), data, (time.perf_counter() - t0) * 1000


async def _until(check: Any, what: str, timeout_s: float = WAIT_S) -> Any:
    """`await check()` every 50 ms until it returns something truthy (returned); RuntimeError
    naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (got := await check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(0.05)
    return got


async def _demo(console: Console, fast: bool, out: Path) -> int:
    """The run, in a state directory of its own: removed when the run ends cleanly (its report
    is in `out`), kept when it does not, for its logs (said on the way out)."""
    state = Path(tempfile.mkdtemp(prefix="hearth-demo-"))
    try:
        rc = await _demo_in(console, fast, out, state)
    except BaseException:
        console.print(f"  [yellow]![/] the node's state and logs are kept in {state}")
        raise
    shutil.rmtree(state, ignore_errors=True)
    return rc


async def _demo_in(console: Console, fast: bool, out: Path, state: Path) -> int:
    settings = Settings.from_env(port=free_port(), host="127.0.0.1")
    settings.state = state
    settings.admin_token = None
    settings.redis_url = None
    steps = Step(console)
    console.rule("[bold]Hearth demo")
    t0 = time.perf_counter()
    async with Platform(settings, warm_pool_size=1) as p:
        assert p.agent is not None
        console.print(
            f"  gateway {p.url} · data plane [bold]{p.agent.mode}[/] · redis {p.redis_url} · state {state}"
        )
        admin = {"Authorization": f"Bearer {p.admin_token}"}
        async with aiohttp.ClientSession() as s:
            await _deploy(s, p, admin)
            steps.ok("deploy", ", ".join(f["name"] for f in DEMO_FUNCTIONS))
            await asyncio.to_thread(_demo_zygotes_ready, p, steps)
            first = await _http_steps(s, p, steps, admin)
            what, result, ms = await _queue_step(p)
            steps.ok(what, result, ms)
            await _scale_to_zero_step(s, p, steps, first)
            extra = await _extras(console, steps, p, s, fast, out)
        console.print(cold_start_table(p.agent.cold_starts))
    console.print(
        f"  [green]✓[/] shut down cleanly · {time.perf_counter() - t0:.1f} s in all"
        + (f" · report: {extra}" if extra else "")
    )
    return 0


async def _deploy(s: aiohttp.ClientSession, p: Platform, admin: dict[str, str]) -> None:
    """Deploy the demo functions through the admin API."""
    for f in DEMO_FUNCTIONS:
        if f["handler"] == "hearth.queue.examples:record":  # it records into Redis
            f = {**f, "env": {"RECORD_REDIS_URL": p.redis_url}}
        spec = parse_spec(f)
        async with s.post(f"{p.url}/v1/functions", json=spec.to_dict(), headers=admin) as r:
            assert r.status in (200, 201), await r.text()


async def _http_steps(
    s: aiohttp.ClientSession, p: Platform, steps: Step, admin: dict[str, str]
) -> dict[str, Any]:
    """hello cold, warm, x200 and async; the 64 MiB zero-copy sum, the chained call, a failing
    handler, an unknown function. hello's first answer (its pid) is returned."""
    inv = f"{p.url}/v1/functions/hello:invoke"
    st, hd, body, ms = await _call(s, inv, json.dumps({"name": "Hearth"}).encode())
    first = json.loads(body)
    steps.ok(
        "hello (cold start)",
        f"HTTP {st}, pid {first['pid']}, cold={hd.get('X-Hearth-Cold')}",
        ms,
    )
    st, hd, body, ms = await _call(s, inv, json.dumps({"name": "again"}).encode())
    second = json.loads(body)
    steps.ok(
        "hello (warm)",
        f"HTTP {st}, same pid: {second['pid'] == first['pid']}, cold={hd.get('X-Hearth-Cold')}",
        ms,
    )
    lat = []
    for _ in range(200):
        _, _, _, ms = await _call(s, inv, b"{}")
        lat.append(ms)
    steps.ok(
        "hello ×200 warm",
        f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms",
    )
    async with s.post(inv + "?async=true", json={"name": "async"}) as r:
        acc = await r.json()

    async def finished() -> dict[str, Any] | None:
        async with s.get(f"{p.url}/v1/invocations/{acc['invocation_id']}") as r:
            rec = await r.json()
        return rec if rec["status"] in ("succeeded", "failed") else None

    rec = await _until(finished, "the async invocation's result")
    steps.ok(
        "hello async (202 → result)",
        f"{rec['status']}: {rec.get('result', {}).get('greeting')}",
    )
    arr = np.arange(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    st, hd, body, ms = await _call(
        s,
        f"{p.url}/v1/functions/array-sum:invoke",
        arr.tobytes(),
        "application/octet-stream",
    )
    res = json.loads(body)
    steps.ok(
        "array-sum 64 MiB",
        f"sum ok: {abs(res['sum'] - float(arr.sum(dtype=np.float64))) < 1}, zero-copy view of the slot: {res['zero_copy']}",
        ms,
    )
    st, hd, body, ms = await _call(
        s,
        f"{p.url}/v1/functions/chain-sum:invoke",
        arr[:1024].tobytes(),
        "application/octet-stream",
    )
    steps.ok(
        "chain-sum → array-sum",
        f"HTTP {st}, {json.loads(body)['downstream']['sum']:.0f} (slot passed on, not copied)",
        ms,
    )
    st, hd, body, ms = await _call(s, f"{p.url}/v1/functions/fail:invoke", b"{}")
    steps.ok("fail (handler raises)", f"HTTP {st} {json.loads(body)['detail']}", ms)
    st, hd, body, ms = await _call(s, f"{p.url}/v1/functions/nope:invoke", b"{}", headers=admin)
    steps.ok("unknown function", f"HTTP {st} {json.loads(body)['error']}", ms)
    return first


async def _scale_to_zero_step(
    s: aiohttp.ClientSession, p: Platform, steps: Step, first: dict[str, Any]
) -> None:
    """hello scales to zero after its 2 s keep-alive; the next call starts a new process."""
    inv = f"{p.url}/v1/functions/hello:invoke"
    steps.console.print("  waiting for hello's keep-alive (2 s) to scale it to zero …")

    async def at_zero() -> bool:
        return not p.agent.functions["hello"].live()

    await _until(at_zero, "hello scaled to zero")
    st, hd, body, ms = await _call(s, inv, b"{}")
    steps.ok(
        "hello after scale-to-zero",
        f"cold={hd.get('X-Hearth-Cold')}, new pid: {json.loads(body)['pid'] != first['pid']}",
        ms,
    )


def cold_start_table(cold_starts: list[dict[str, Any]]) -> Table:
    """Median ms per cold-start phase (the Huawei trace's columns), per function and origin."""
    table = Table(title="Cold starts on this run: median ms per phase (Huawei trace columns)")
    for c in ("function", "origin", "n", "sched.", "pod alloc", "code", "deps", "total"):
        table.add_column(c, justify="left" if c in ("function", "origin") else "right")
    groups: dict[tuple[str, str], list[list[float]]] = {}
    for rec in cold_starts:
        ph = rec["phases"]
        costs = [
            ph["spawned"] - ph["requested"],
            ph["process_started"] - ph["spawned"],
            ph["code_imported"] - ph["process_started"],
            ph["ready"] - ph["code_imported"],
        ]
        fn = rec["function"] if not rec["function"].startswith("demo-fl") else "fedavg tree"
        groups.setdefault((fn, "warm pool" if rec["from_pool"] else "new process"), []).append(
            [*costs, sum(costs)]
        )
    for (fn, origin), rows in groups.items():
        med = np.median(np.array(rows), axis=0) * 1000
        table.add_row(fn, origin, str(len(rows)), *(f"{v:.1f}" for v in med))
    return table


async def _queue_step(p: Platform) -> tuple[str, str, float]:
    """Redis-stream events through the trigger: a burst (the trigger carries the backlog to the
    instance in batches), one poison event that ends in the dead-letter stream."""
    from hearth.queue.examples import record_key
    from hearth.queue.producer import build_fields

    assert p.redis is not None and p.agent is not None
    stream, fail_at = "demo-orders", QUEUE_EVENTS // 2
    t0 = time.perf_counter()
    pipe = p.redis.pipeline(transaction=False)
    for i in range(QUEUE_EVENTS):
        pipe.xadd(stream, build_fields(stream, {"order": i, "fail": i == fail_at}, None, None))
    await pipe.execute()

    async def drained() -> tuple[int, int, int] | None:
        done = await p.redis.llen(record_key(stream))
        dead = await p.redis.xlen(f"{stream}:dlq")
        # processed is not yet acknowledged: the trigger acks after the handler returns, so
        # wait for the acks too (a busy machine shows the gap)
        pending = (await p.redis.xpending(stream, "hearth-orders"))["pending"]
        return (
            (done, dead, pending)
            if done >= QUEUE_EVENTS - 1 and dead >= 1 and not pending
            else None
        )

    done, dead, pending = await _until(drained, f"{QUEUE_EVENTS} stream events handled")
    ms = (time.perf_counter() - t0) * 1000
    ((_id, dl),) = await p.redis.xrange(f"{stream}:dlq", count=1)
    batched = p.agent.metrics.batched_events.labels("orders")._value.get()
    return (
        f"queue: {QUEUE_EVENTS} events on a stream",
        f"{done} processed, {dead} dead-lettered ({dl[b'error'].decode()[:40]}…), "
        f"{pending} pending; {batched / QUEUE_EVENTS:.0%} carried in batches",
        ms,
    )


async def _extras(
    console: Console, steps: Step, p: Platform, s: aiohttp.ClientSession, fast: bool, out: Path
) -> str | None:
    """The built-in functions on the live platform: an FL round, and a trace replay whose
    cold starts (Hearth's own export + the replay's records) become the cold-start report."""
    if fast:
        return None
    console.print("  federated round: 12 simulated clients × 1 M params, 2-level tree, 2 rounds …")
    fl = await asyncio.to_thread(_fl_rounds, p, steps)
    steps.ok(
        "fedavg through the platform",
        f"max rel. error vs exact FedAvg {fl['max_rel_err']:.1e}, round 2 on the same processes: {fl['warm']}",
        fl["ms"],
    )
    console.print("  trace replay: 10 s of a (synthetic) Azure-2021-style trace at 20 req/s …")
    rep = await asyncio.to_thread(_replay_and_report, p, out)
    steps.ok(
        "replay + cold-start report",
        f"{rep['sent']} sent, {rep['ok']} ok, lag p99 {rep['lag_p99_ms']:.1f} ms; report {rep['report']}",
    )
    return rep["report"]


def _demo_zygotes_ready(p: Platform, steps: Step) -> None:
    """The zygotes the deploy started for the demo functions' preload lists."""
    from hearth.client import Client

    zygotes_ready(Client(p.url, token=p.admin_token), steps, map(parse_spec, DEMO_FUNCTIONS))


def _fl_rounds(p: Platform, steps: Step) -> dict[str, Any]:
    from hearth.client import Client
    from hearth.functions.fedavg import client as fl
    from hearth.functions.fedavg.aggregation import exact_fedavg, parse_model
    from hearth.functions.fedavg.tree import plan_tree

    assert p.agent is not None
    c = Client(p.url, token=p.admin_token)
    clients, params = 12, 1_000_000
    plan = plan_tree({p.agent.nodes[0].name: clients}, fan_in=4, levels=2, prefix="demo-fl")
    for spec in plan.function_specs(model_bytes=params * 4 + (1 << 16)):
        c.deploy(spec.to_dict())  # the first starts the built-ins' zygote
    builtins_zygote_ready(c, steps)
    rng = np.random.default_rng(0)
    t0, worst, pids = time.perf_counter(), 0.0, []
    for rnd in (1, 2):
        fl.open_round(p.url, plan, rnd)
        ups = [
            (
                [
                    ("w", rng.uniform(0.5, 1.5, params // 2).astype(np.float32)),
                    ("b", rng.uniform(0.5, 1.5, params // 2).astype(np.float32)),
                ],
                int(rng.integers(10, 1000)),
            )
            for _ in range(clients)
        ]
        for i, (m, n) in enumerate(ups):
            fl.submit(p.url, plan.leaf_for(plan.nodes[0][0], i).instance, m, n, rnd, f"client-{i}")
        model = parse_model(fl.fetch(p.url, plan, rnd).body)
        for (_, got), (_, want) in zip(model.layers, exact_fedavg(ups), strict=True):
            worst = max(worst, float(np.max(np.abs(got - want) / np.abs(want))))
        fns = c.status()["functions"]
        pids.append(
            sorted(
                i["pid"]
                for name, f in fns.items()
                if name.startswith("demo-fl")
                for i in f["instances"]
            )
        )
    return {
        "max_rel_err": worst,
        "warm": pids[0] == pids[1],
        "ms": (time.perf_counter() - t0) * 1000,
    }


def _replay_and_report(p: Platform, out: Path) -> dict[str, Any]:
    import hearth.functions.replay as replay_pkg
    from hearth.client import Client
    from hearth.coldstart_log import to_records
    from hearth.controller.coldstarts import to_huawei_csv
    from hearth.functions.replay import analyze
    from hearth.functions.replay.demo import demo_replay
    from hearth.spec import load_spec

    assert p.agent is not None
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(Path(replay_pkg.__file__).parent / "specs" / "replay-workload.yaml")
    # The node is this machine, shared with the FedAvg tree and the examples still deployed: the
    # spec's 1000m x max_instances 8 is all of a 2-core node's 8000m, so a burst could have a
    # start refused (429 no_capacity). The replay's short events need far less: request 250m.
    res_ = spec.resources.model_copy(update={"cpu_millicores": 250})
    spec = spec.model_copy(update={"resources": res_})
    Client(p.url, token=p.admin_token).deploy(spec.to_dict())
    res = demo_replay(
        p.url, function=spec.name, out=out / "replay", coldstarts=None, rate=20.0, seconds=10.0
    )
    # X-Hearth-Cold marks a call that *caused* a start; another instance may have served it while
    # that start was still running: export once no start of the function is in flight, so every
    # start the replay caused is in the cold-start report.
    fs = p.agent.functions.get(spec.name)
    deadline = time.monotonic() + WAIT_S
    while fs is not None and fs.starting:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{fs.starting} start(s) of {spec.name} still running after {WAIT_S:g} s"
            )
        time.sleep(0.05)
    cold_csv = out / "coldstarts.csv"
    to_huawei_csv(
        to_records(p.agent.cold_starts), cold_csv
    )  # Hearth's own cold starts, Huawei columns
    analyze.run([[cold_csv, res["records"]]], out / "report", labels=["hearth demo"])
    summary = res["replay"]
    return {
        "sent": summary.get("invocations", 0),
        "ok": summary.get("ok", 0),
        "lag_p99_ms": summary.get("lag_ms_p99", float("nan")),
        "report": str(out / "report" / "report.html"),
    }


def run_demo(fast: bool = False, out: str = "out/demo") -> int:
    console = Console()
    try:
        return asyncio.run(_demo(console, fast, Path(out)))
    except Exception as e:  # one clear line, never a traceback
        console.print(f"[red]error:[/] demo failed: {type(e).__name__}: {e}")
        return 1
