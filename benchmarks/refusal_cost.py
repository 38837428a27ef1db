"""What a 503 refusal costs the node gateway: on its fast path (answered from the read, issue #16's
"cheaper refusal at the protocol level") against the same refusal through aiohttp's shedding
middleware, in the same gateway process and the same run.

The gateway is `make_app` + `listen` as `hearth up` serves it, in a child process, with its loop-lag
shedding held on (the lag state marked late, so every invoke is shed). A client process sends the
same invoke one after another on a keep-alive connection, alternating rounds of plain requests
(the fast path takes them) and the same request with a `Prefer` header (the fast path hands those
to aiohttp). Reported: the gateway's CPU per refusal (from /proc, median of the rounds) and the
client's round-trip p50. Ends with one JSON line.

    .venv/bin/python benchmarks/refusal_cost.py [--quick] [--rounds 6] [--n 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

SERVER = r"""
import asyncio, os, sys, uuid
from aiohttp import web
import redis.asyncio as aioredis
from hearth.dataplane.shm import SlotPool
from hearth.gateway.app import make_app
from hearth.gateway.shed import LOOP_LAG
from hearth.gateway.sojourn import listen
from hearth.node import NodeAgent
from hearth.registry import Registry

async def main():
    pool = SlotPool.create(f"hearth-refusal-{os.getpid()}-{uuid.uuid4().hex[:6]}", [(4096, 4)])
    try:
        agent = NodeAgent(pool, sys.argv[1] + "/no-proxy.sock")
        app = make_app(agent, Registry(aioredis.Redis()), admin_token="t", max_body_bytes=1 << 20,
                       shed_lag_s=0.02)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        lag = app[LOOP_LAG]
        lag.stop()  # no timer: the state below stays "behind" for the whole run
        st = lag.state
        st.due, st.behind_since, st.late_ticks = -1e9, -1e9, 10**6
        server = await listen(runner, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()  # until stopped (SIGINT)
    finally:
        pool.destroy()

try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass  # stopped by the benchmark: the pool is destroyed
"""


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def round_trip(sock: socket.socket, req: bytes, n: int) -> list[float]:
    lat, buf = [], b""
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(req)
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, buf = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), head[:80]
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(buf) < length:
            buf += sock.recv(65536)
        buf = buf[length:]
        lat.append((time.perf_counter() - t0) * 1000)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="4 rounds of 2,000 (default 8 of 5,000)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="requests per round and path")
    a = ap.parse_args()
    rounds = a.rounds or (4 if a.quick else 8)
    n = a.n or (2000 if a.quick else 5000)
    tmp = tempfile.mkdtemp(prefix="hearth-refusal-")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    srv = subprocess.Popen(
        [sys.executable, "-c", SERVER, tmp], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        port = int(srv.stdout.readline())  # type: ignore[union-attr]
        base = (
            "POST /v1/functions/noop:invoke HTTP/1.1\r\nHost: bench\r\n"
            "Authorization: Bearer t\r\nContent-Length: 0\r\n"
        )
        reqs = {
            "fast path": (base + "\r\n").encode(),
            "aiohttp": (base + "Prefer: x\r\n\r\n").encode(),
        }
        cpu: dict[str, list[float]] = {k: [] for k in reqs}
        p50: dict[str, list[float]] = {k: [] for k in reqs}
        for req in reqs.values():  # warm-up
            with socket.create_connection(("127.0.0.1", port)) as s:
                round_trip(s, req, 200)
        for r in range(rounds):
            for k, req in reqs.items():
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    c0 = cpu_s(srv.pid)
                    lat = round_trip(s, req, n)
                    cpu[k].append((cpu_s(srv.pid) - c0) / n * 1e6)
                    p50[k].append(statistics.median(lat))
            print(
                f"round {r + 1}: "
                + "  ".join(f"{k} {cpu[k][-1]:.0f} us CPU, p50 {p50[k][-1]:.3f} ms" for k in reqs),
                flush=True,
            )
    finally:
        # SIGINT: asyncio.run cancels the server's main task, whose `finally` destroys its slot
        # pool (a kill left /dev/shm/hearth-refusal-* behind, one per run)
        srv.send_signal(signal.SIGINT)
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # (a run left it behind before)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    med_p50 = {k: statistics.median(v) for k, v in p50.items()}
    ratio = med_cpu["fast path"] / med_cpu["aiohttp"]
    print(
        f"\n503 refusal, gateway CPU per request: fast path {med_cpu['fast path']:.0f} us, "
        f"aiohttp {med_cpu['aiohttp']:.0f} us ({ratio:.2f}x; target <= 0.5x); round trip p50 "
        f"{med_p50['fast path']:.3f} vs {med_p50['aiohttp']:.3f} ms"
    )
    out = {
        "benchmark": "refusal_cost",
        "rounds": rounds,
        "n": n,
        "fast_cpu_us": round(med_cpu["fast path"], 1),
        "aiohttp_cpu_us": round(med_cpu["aiohttp"], 1),
        "fast_cpu_us_rounds": [round(x, 1) for x in cpu["fast path"]],
        "aiohttp_cpu_us_rounds": [round(x, 1) for x in cpu["aiohttp"]],
        "cpu_ratio": round(ratio, 3),
        "fast_p50_ms": round(med_p50["fast path"], 3),
        "aiohttp_p50_ms": round(med_p50["aiohttp"], 3),
        "target_cpu_ratio_le_0_5": ratio <= 0.5,
        "loadavg_at_end": round(os.getloadavg()[0], 2),
    }
    out["targets_met"] = all(v for k, v in out.items() if k.startswith("target_"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
