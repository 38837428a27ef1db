"""The load generators of gateway_overhead.py and the figures of their rounds: aiohttp's client
in a closed loop (fixed concurrency) or an open loop (fixed rate), the lean client's open loop
(lean_load.py), each in a process of its own (spawned: the generator's CPU is not the measuring
process's), and the serial client (one request at a time on one keep-alive connection).
Latencies are of successful (200) responses only: a fast error must not pull a percentile down."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import numpy as np


def _loadgen(
    url: str, mode: str, seconds: float, concurrency: int, rate: float, q: mp.Queue
) -> None:
    if mode == "lean":  # the open loop with the lean client (lean_load.py)
        from lean_load import run_open_loop

        q.put(run_open_loop(url, seconds, rate))
        return
    import aiohttp

    async def post(s: aiohttp.ClientSession, lat: list[float]) -> int:
        """One POST, its latency appended to `lat` if it succeeded; 1 if it failed (not 200:
        not timed, so fast errors cannot pull a percentile down), else 0."""
        t0 = time.perf_counter()
        async with s.post(url, data=b"") as r:
            await r.read()
            failed = int(r.status != 200)
        if not failed:
            lat.append(time.perf_counter() - t0)
        return failed

    async def closed() -> dict:
        lat: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < stop:
                    failed = await post(s, lat)  # awaited first: `errors` is shared by workers
                    errors += failed

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            el = time.perf_counter() - t0
        return {"n": len(lat), "rps": len(lat) / el, "lat": lat, "errors": errors}

    async def open_loop() -> dict:
        lat: list[float] = []
        errors = 0
        n = int(seconds * rate)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:

            async def one() -> None:
                nonlocal errors
                failed = await post(s, lat)
                errors += failed

            start = time.perf_counter()
            tasks = []
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
            el = time.perf_counter() - start
        return {"n": len(lat), "rps": len(lat) / el, "lat": lat, "errors": errors}

    q.put(asyncio.run(closed() if mode == "closed" else open_loop()))  # (mode "open")


def serial_p50(url: str, n: int) -> float:
    """p50 (ms) of `n` requests sent one after another on one keep-alive connection. Any answer
    but 200 makes the measurement fail (RuntimeError naming the count and the first status): a
    fast 429 or 503 must not pass for a fast invoke."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    lat = []
    bad: list[int] = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            c.request("POST", u.path, body=b"")
            r = c.getresponse()
            r.read()
            lat.append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                bad.append(r.status)
    finally:
        c.close()
    if bad:
        raise RuntimeError(
            f"serial: {len(bad)} of {n} answers to {url} were not 200 (first: {bad[0]})"
        )
    return float(np.median(lat))


def collect(url: str, mode: str, seconds: float, concurrency: int = 32, rate: float = 500) -> dict:
    """One measurement's raw result (latencies in seconds), from the generator's own process."""
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(
        target=_loadgen, args=(url, mode, seconds, concurrency, rate, q)
    )
    p.start()
    res = q.get(timeout=seconds * 4 + 60)
    p.join()
    return res


def figures(runs: list[dict]) -> dict:
    """The figures of one target's measurement from its rounds' raw results, pooled: rps
    (mean of the rounds'), errors, and percentiles (ms) of the successful responses' latencies
    (infinite if none succeeded); for the lean client also from the intended send times
    (`*_intended_ms`) and the sends' lateness (`late_p99_ms`)."""

    def pct(key: str, q: float) -> float:
        xs = np.concatenate([np.asarray(r[key], dtype=float) for r in runs]) * 1000
        return float(np.percentile(xs, q)) if len(xs) else float("inf")

    out = {
        "n": sum(r["n"] for r in runs),
        "rps": float(np.mean([r["rps"] for r in runs])),
        "errors": sum(r["errors"] for r in runs),
        "p50_ms": pct("lat", 50),
        "p99_ms": pct("lat", 99),
        "max_ms": pct("lat", 100),
    }
    if "lat_intended" in runs[0]:
        out.update(
            p50_intended_ms=pct("lat_intended", 50),
            p99_intended_ms=pct("lat_intended", 99),
            late_p99_ms=pct("late", 99),
            timed_out=sum(r["timed_out"] for r in runs),
            connections=max(r["opened"] for r in runs),
        )
    return out


def run_load(url: str, mode: str, seconds: float, concurrency: int = 32, rate: float = 500) -> dict:
    """One measurement's figures (see `figures`)."""
    return figures([collect(url, mode, seconds, concurrency, rate)])
