"""Chaos: publish events to a queue-triggered function while instances are SIGKILLed every second.

A Hearth node runs in this process (hearth.up.Platform: proxy daemon, shared-memory slots, node
agent, queue service) against a private loopback redis-server. The function `chaos` (handler
hearth.queue.examples:record, a few ms of work per event) has a Redis-stream trigger; after its
work it appends '<entry id> <pid> <delivery>' to a Redis list. The chaos loop SIGKILLs a random
live instance of it every second (real kill -9 of instance processes; the consumer is the
platform's runner, as in production). Events are published at a steady rate so the kills span
the run. Afterwards it prints:

  published, processed_at_least_once, lost (must be 0), duplicated, and for every duplicated
  event whether one of the instances that processed it was killed (duplicates_unexplained must
  be 0: a duplicate only happens when an instance finished the work but died before replying),
  dead_lettered, redelivered, kills. The baseline side by side: the same events through the same
  function with no chaos (processing time and rate), so the cost of the kills shows as a ratio.

    .venv/bin/python benchmarks/queue_chaos.py [--quick] [--events N] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import msgpack
import redis.asyncio as aioredis
from hearth.config import Settings
from hearth.queue.examples import record_key
from hearth.queue.wire import encode_entry
from hearth.redis_server import RedisServer, free_port
from hearth.spec import FunctionSpec
from hearth.up import Platform

FN = "chaos"


def spec(stream: str, work_s: float, redis_url: str = "") -> FunctionSpec:
    return FunctionSpec.model_validate(
        {
            "name": FN,
            "handler": "hearth.queue.examples:record",
            "env": {"RECORD_REDIS_URL": redis_url} if redis_url else {},
            "concurrency": 4,
            "min_instances": 2,
            "max_instances": 4,
            "queue_size": 100_000,
            "timeout_s": 30,
            "keep_alive": {"ttl_s": 60},
            "triggers": [
                {"type": "http"},
                {
                    "type": "redis-stream",
                    "stream": stream,
                    "batch_size": 32,
                    "max_inflight": 32,
                    "max_deliveries": 10,
                    "backoff_s": 0.05,
                    "backoff_max_s": 1.0,
                    "claim_idle_s": 5.0,
                },
            ],
        }
    )


def live_pids(p: Platform) -> list[int]:
    st = p.agent.status()["functions"].get(FN, {})
    return [
        i["pid"] for i in st.get("instances", []) if i["pid"] and i["state"] in ("idle", "busy")
    ]


async def run_once(
    url: str,
    state: Path,
    stream: str,
    n: int,
    rate: float,
    work_s: float,
    chaos: bool,
    timeout: float,
) -> dict:
    r = aioredis.Redis.from_url(url)
    await r.delete(stream, stream + ":dlq", record_key(stream))
    s = Settings(
        port=free_port(),
        redis_url=url,
        state=state,
        dataplane_mode="auto",
        admin_token="chaos-token-0123456789",
    )
    p = Platform(s, deploy=[spec(stream, work_s, url)])
    await p.start()
    killed: dict[int, float] = {}
    published: list[str] = []
    stop_chaos = asyncio.Event()
    try:
        t_wait = time.monotonic()
        while len(live_pids(p)) < 2 and time.monotonic() - t_wait < 60:
            await asyncio.sleep(0.1)

        async def chaos_loop() -> None:
            while not stop_chaos.is_set():
                try:
                    await asyncio.wait_for(stop_chaos.wait(), 1.0)
                except TimeoutError:
                    pids = live_pids(p)
                    if pids:
                        pid = random.choice(pids)
                        try:
                            os.kill(pid, signal.SIGKILL)
                            killed[pid] = time.monotonic()
                        except ProcessLookupError:
                            pass

        async def produce() -> None:
            batch = max(1, int(rate / 20))
            t0 = time.monotonic()
            while len(published) < n:
                k = min(batch, n - len(published))
                async with r.pipeline(transaction=False) as pipe:
                    for j in range(k):
                        body = msgpack.packb({"i": len(published) + j, "sleep_s": work_s})
                        pipe.xadd(stream, encode_entry(body, "application/msgpack"))
                    ids = await pipe.execute()
                published.extend(x.decode() for x in ids)
                ahead = len(published) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)

        t0 = time.monotonic()
        chaos_task = asyncio.create_task(chaos_loop()) if chaos else None
        await produce()
        t_pub = time.monotonic() - t0
        group = f"hearth-{FN}"

        async def done() -> bool:
            seen = {x.split()[0] for x in await r.lrange(record_key(stream), 0, -1)}
            dlq = {f[b"source_id"].decode() for _, f in await r.xrange(stream + ":dlq")}
            pend = (await r.xpending(stream, group))["pending"]
            return {x.decode() for x in seen} | dlq >= set(published) and pend == 0

        while not await done():
            if time.monotonic() - t0 > timeout:
                break
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - t0
        stop_chaos.set()
        if chaos_task:
            await chaos_task
        log = [x.decode().split() for x in await r.lrange(record_key(stream), 0, -1)]
        by_id: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for eid, pid, delivery in log:
            by_id[eid].append((int(pid), int(delivery)))
        dl_entries = await r.xrange(stream + ":dlq")
        dead = [f[b"source_id"].decode() for _, f in dl_entries]
        reasons: dict[str, int] = defaultdict(int)
        for _, f in dl_entries:
            reasons[f[b"error"].decode(errors="replace")[:120]] += 1
        pub = set(published)
        processed = pub & set(by_id)
        # still in Redis at the end (pending in the PEL, or not yet delivered): not lost, unfinished
        queued = {
            x["message_id"].decode()
            for x in await r.xpending_range(stream, f"hearth-{FN}", "-", "+", 1_000_000)
        }
        groups = await r.xinfo_groups(stream)
        last = groups[0]["last-delivered-id"].decode() if groups else "0-0"
        queued |= {e.decode() for e, _ in await r.xrange(stream, min="(" + last)}
        unfinished = (pub - set(by_id) - set(dead)) & queued
        lost = pub - set(by_id) - set(dead) - queued
        dups = {e: v for e, v in by_id.items() if len(v) > 1}
        unexplained = [e for e, v in dups.items() if not any(pid in killed for pid, _ in v)]
        redelivered = sum(1 for v in by_id.values() if any(d > 1 for _, d in v))
        return {
            "published": len(pub),
            "processed_at_least_once": len(processed),
            "lost": len(lost),
            "unfinished_still_queued": len(unfinished),
            "duplicated": len(dups),
            "duplicates_explained_by_kill": len(dups) - len(unexplained),
            "duplicates_unexplained": len(unexplained),
            "dead_lettered": len(dead),
            "redelivered": redelivered,
            "kills": len(killed),
            "publish_s": round(t_pub, 2),
            "elapsed_s": round(elapsed, 2),
            "timed_out": elapsed >= timeout,
            "data_plane": p.agent.mode,
            "slots_in_use_at_end": p.agent.pool.stats()["used"],  # should be ~0 when drained
            "lost_ids_sample": sorted(lost)[:5],
            "dead_letter_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5]),
        }
    finally:
        stop_chaos.set()
        await p.stop()
        await r.aclose()


async def main_async(args) -> dict:
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="hearth-qchaos-"))
    srv = RedisServer(tmp / "redis").start()
    os.environ["HEARTH_REDIS_URL"] = srv.url
    try:
        base = await run_once(
            srv.url,
            tmp / "s0",
            "chaos-base",
            args.events,
            args.rate,
            args.work_s,
            False,
            args.timeout,
        )
        print(
            "baseline (no kills): "
            + ", ".join(f"{k}={v}" for k, v in base.items() if not isinstance(v, dict))
        )
        ch = await run_once(
            srv.url, tmp / "s1", "chaos", args.events, args.rate, args.work_s, True, args.timeout
        )
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # (a run left it behind before)
    print()
    print(f"published                     {ch['published']}")
    print(f"processed at least once       {ch['processed_at_least_once']}")
    print(f"lost                          {ch['lost']}   (must be 0)")
    print(
        f"duplicated                    {ch['duplicated']}   (explained by a kill of the instance that ran it: {ch['duplicates_explained_by_kill']}, unexplained: {ch['duplicates_unexplained']})"
    )
    print(f"dead-lettered                 {ch['dead_lettered']}")
    print(
        f"unfinished (still queued)     {ch['unfinished_still_queued']}   (not lost: pending in Redis when the run ended)"
    )
    print(f"redelivered (delivery > 1)    {ch['redelivered']}")
    print(
        f"instances SIGKILLed           {ch['kills']}  over {ch['elapsed_s']} s  (data plane {ch['data_plane']})"
    )
    slow = ch["elapsed_s"] / max(base["elapsed_s"], 1e-9)
    print(
        f"time to drain vs no-chaos baseline: {ch['elapsed_s']} s vs {base['elapsed_s']} s = {slow:.2f}x"
    )
    out = {
        **{k: v for k, v in ch.items() if k != "lost_ids_sample"},
        "baseline_elapsed_s": base["elapsed_s"],
        "baseline_lost": base["lost"],
        "baseline_duplicated": base["duplicated"],
        "chaos_vs_baseline_time_ratio": round(slow, 3),
        "ok": ch["lost"] == 0 and ch["duplicates_unexplained"] == 0 and not ch["timed_out"],
        "load_note": f"2 shared cores; loadavg {os.getloadavg()[0]:.1f} at end",
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 events (about a minute)")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="publish rate, events/s")
    ap.add_argument("--work-s", type=float, default=0.002, help="handler work per event")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    args.events = args.events or (2_000 if args.quick else 10_000)
    args.rate = args.rate or (200.0 if args.quick else 400.0)
    res = asyncio.run(main_async(args))
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
