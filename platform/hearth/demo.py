"""`hearth demo`: start Hearth on this machine, deploy example functions, invoke them over HTTP
(sync and async), show a cold start and warm reuse, a zero-copy 64 MB payload and a chained call,
and shut down cleanly. Larger steps (an FL round, a trace replay with its cold-start report) are
added by those functions' modules when present."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any  # noqa: F401

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

from hearth.config import Settings
from hearth.redis_server import free_port
from hearth.spec import parse_spec
from hearth.up import Platform

H = "hearth.functions.examples.handlers"
DEMO_FUNCTIONS = [
    {
        "name": "hello",
        "handler": f"{H}:hello",
        "concurrency": 2,
        "max_instances": 2,
        "keep_alive": {"ttl_s": 2},
    },
    {
        "name": "array-sum",
        "handler": f"{H}:array_sum",
        "max_instances": 2,
        "keep_alive": {"ttl_s": 30},
    },
    {
        "name": "chain-sum",
        "handler": f"{H}:chain_sum",
        "max_instances": 1,
        "keep_alive": {"ttl_s": 30},
    },
    {"name": "fail", "handler": f"{H}:fail", "max_instances": 1},
]


class Step:
    def __init__(self, console: Console):
        self.console = console
        self.rows: list[tuple[str, str, str]] = []

    def ok(self, what: str, result: str, ms: float | None = None) -> None:
        self.rows.append((what, result, f"{ms:.1f}" if ms is not None else ""))
        self.console.print(
            f"  [green]✓[/] {what}: {result}"
            + (f"  [dim]({ms:.1f} ms)[/]" if ms is not None else "")
        )


async def _call(
    session: aiohttp.ClientSession, url: str, body: bytes, ctype: str = "application/json"
) -> tuple[int, dict[str, str], bytes, float]:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": ctype}) as r:
        data = await r.read()
        return r.status, dict(r.headers), data, (time.perf_counter() - t0) * 1000


async def _demo(console: Console, fast: bool, out: Path) -> int:
    state = Path(tempfile.mkdtemp(prefix="hearth-demo-"))
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
            for f in DEMO_FUNCTIONS:
                spec = parse_spec(f)
                async with s.post(f"{p.url}/v1/functions", json=spec.to_dict(), headers=admin) as r:
                    assert r.status in (200, 201), await r.text()
            steps.ok("deploy", ", ".join(f["name"] for f in DEMO_FUNCTIONS))
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
            for _ in range(200):
                async with s.get(f"{p.url}/v1/invocations/{acc['invocation_id']}") as r:
                    rec = await r.json()
                if rec["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
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
            st, hd, body, ms = await _call(s, f"{p.url}/v1/functions/nope:invoke", b"{}")
            steps.ok("unknown function", f"HTTP {st} {json.loads(body)['error']}", ms)
            console.print("  waiting for hello's keep-alive (2 s) to scale it to zero …")
            for _ in range(100):
                if not p.agent.functions["hello"].live():
                    break
                await asyncio.sleep(0.1)
            st, hd, body, ms = await _call(s, inv, b"{}")
            steps.ok(
                "hello after scale-to-zero",
                f"cold={hd.get('X-Hearth-Cold')}, new pid: {json.loads(body)['pid'] != first['pid']}",
                ms,
            )
            extra = await _extras(console, steps, p, s, fast, out)
        table = Table(title="Cold starts on this run (Huawei trace columns, ms)")
        for c in (
            "function",
            "origin",
            "scheduling",
            "pod alloc",
            "deploy code",
            "deploy deps",
            "total",
        ):
            table.add_column(c, justify="right" if c not in ("function", "origin") else "left")
        for rec in p.agent.cold_starts:
            ph = rec["phases"]
            costs = [
                ph["spawned"] - ph["requested"],
                ph["process_started"] - ph["spawned"],
                ph["code_imported"] - ph["process_started"],
                ph["ready"] - ph["code_imported"],
            ]
            table.add_row(
                rec["function"],
                "warm pool" if rec["from_pool"] else "new process",
                *(f"{c * 1000:.1f}" for c in costs),
                f"{sum(costs) * 1000:.1f}",
            )
        console.print(table)
    console.print(
        f"  [green]✓[/] shut down cleanly · {time.perf_counter() - t0:.1f} s in all"
        + (f" · report: {extra}" if extra else "")
    )
    return 0


async def _extras(
    console: Console, steps: Step, p: Platform, s: aiohttp.ClientSession, fast: bool, out: Path
) -> str | None:
    """Steps contributed by the built-in functions (FL round, replay + cold-start report)."""
    report = None
    if fast:
        return None
    try:
        from hearth.functions.fedavg.demo import demo_round
    except ImportError:
        demo_round = None
    if demo_round is not None:
        summary = await demo_round(p, s, console)
        steps.ok("federated round (fedavg)", summary)
    try:
        from hearth.functions.replay.demo import demo_replay
    except ImportError:
        demo_replay = None
    if demo_replay is not None:
        summary, report = await demo_replay(p, s, console, out)
        steps.ok("trace replay + cold-start report", summary)
    return report


def run_demo(fast: bool = False, out: str = "out/demo") -> int:
    console = Console()
    try:
        return asyncio.run(_demo(console, fast, Path(out)))
    except Exception as e:  # one clear line, never a traceback
        console.print(f"[red]error:[/] demo failed: {type(e).__name__}: {e}")
        return 1
