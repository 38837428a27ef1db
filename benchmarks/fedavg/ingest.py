"""The fold benchmark's ingestion: the gateway's slot write alone, and through its HTTP path.

A client process POSTs each packed update over loopback TCP to an aiohttp server whose handler
is the gateway's own body streaming (hearth.gateway.body._read_into_slot: socket -> slot, one
copy). The descriptor the gateway then sends is 64 bytes (~12 us per hop, docs/dataplane.md).
The client process, and a leaf's process reading the slots, are ``fedavg_vs_flower.py`` run
with ``--http-client`` and ``--read-slots``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from aiohttp import web
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import DEFAULT_TRIM_THRESHOLD, TRIM_OFF
from hearth.functions.fedavg.aggregation import Aggregation, Ingested
from hearth.gateway.body import _read_into_slot  # the gateway's body -> slot streaming

from fedavg.fold_inputs import FoldSet
from fedavg.sizes import GB

# the benchmark's script: its --http-client and --read-slots modes are the other processes
SCRIPT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "fedavg_vs_flower.py"))


def http_client(port: int, pool_name: str, spec: str) -> int:
    """The trainers' side (a separate process): copy the packed updates into private memory,
    then POST all of them once per "go" line on stdin; print each round's wall time."""
    import http.client

    pool = SlotPool.attach(pool_name)
    bodies = [bytes(pool.view(s, g, n)) for s, g, n in json.loads(spec)]
    pool.close()
    print("ready", flush=True)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        for b in bodies:
            conn.request(
                "POST", "/update", body=b, headers={"Content-Type": "application/octet-stream"}
            )
            r = conn.getresponse()
            r.read()
            assert r.status == 200, r.status
        print(time.perf_counter() - t0, flush=True)
    return 0


def slot_reader(pool_name: str, spec: str) -> int:
    """A leaf in its own process: read every update slot of a round twice (x.sum()). The first
    pass maps the pages into this process (read faults: on the platform every round pays them
    when the slots are trimmed on release); the second is what rounds 2+ cost with pages kept."""
    pool = SlotPool.attach(pool_name)
    views = [np.frombuffer(pool.view(s, g, n), np.uint8) for s, g, n in json.loads(spec)]
    flat = [v[: v.size // 4 * 4].view(np.float32) for v in views]
    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        for f in flat:
            f.sum()
        out.append(time.perf_counter() - t0)
    print(json.dumps(out), flush=True)
    del views, flat
    return 0


def release_all(pool: SlotPool, slots: list, trim: int) -> None:
    """Release slots as the leaves do after folding, with the given trim policy."""
    keep, pool.trim_threshold = pool.trim_threshold, trim
    try:
        for s in slots:
            s.release()
    finally:
        pool.trim_threshold = keep


async def http_ingest_rounds(pool: SlotPool, spec: list, rounds: list) -> tuple[list, list]:
    """Serve the gateway's body streaming, let the client POST every update once per round.

    ``rounds``: ``(label, before)`` where ``before(prev_slots)`` runs between rounds (it releases
    the previous round's slots with some trim policy, or prefaults). Returns the per-round
    figures and the last round's :class:`SlotPayload` list (kept)."""
    got: list = []
    read_s = [0.0]

    async def update(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        got.append(await _read_into_slot(request, pool, request.content_length))
        read_s[0] += time.perf_counter() - t0
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/update", update)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--http-client",
        str(sock.getsockname()[1]),
        pool.name,
        json.dumps(spec),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = await proc.stdout.readline()
        assert line.strip() == b"ready", line
        res, prev = [], []
        for label, before in rounds:
            extra = before(prev)
            got.clear()
            read_s[0] = 0.0
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            wall = float(await proc.stdout.readline())
            assert len(got) == len(spec), (len(got), len(spec))
            res.append({"label": label, "s": wall, "gateway_read_s": read_s[0], **(extra or {})})
            prev = [p.slot for p in got]
            final = list(got)
        proc.stdin.write(b"quit\n")
        await proc.stdin.drain()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    return res, final


def slot_write_alone(fs: FoldSet, rng: np.random.Generator, out: dict) -> list[Ingested]:
    """(a) The gateway's slot write alone (in process): each client's arrays packed into a
    slot with fresh tmpfs pages (round 1), then again into the same slot, released with its
    pages kept (rounds 2+). Returns the updates, in their slots."""
    pool, nbytes, counts = fs.pool, fs.nbytes, fs.counts
    holder = Aggregation(fs.plan, pool=pool)  # its ingest() is the gateway's write
    holder.start_round(1)
    write_s = {"round1": 0.0, "round2plus": 0.0}
    items = []
    for i in range(fs.nclients):
        client = [
            (f"layer{j}", rng.random(s, dtype=np.float32) + 0.5) for j, s in enumerate(fs.shapes)
        ]
        t = time.perf_counter()
        it = holder.ingest(client, counts[i], client=f"c{i}")
        write_s["round1"] += time.perf_counter() - t
        release_all(pool, [it.slot], TRIM_OFF)
        t = time.perf_counter()
        it = holder.ingest(client, counts[i], client=f"c{i}")  # the same slot comes back
        write_s["round2plus"] += time.perf_counter() - t
        items.append(it)
        del client
    holder.round = None
    for k, v in write_s.items():
        out[f"slot_write_{k}"] = {"s": v, "gbps": nbytes / v / GB}
    print(
        f"  slot write alone (in process)  round 1 (fresh pages) {write_s['round1']:6.3f} s "
        f"{nbytes / write_s['round1'] / GB:5.2f} GB/s;  round 2+ (pages kept) "
        f"{write_s['round2plus']:6.3f} s {nbytes / write_s['round2plus'] / GB:5.2f} GB/s",
        flush=True,
    )
    return items


def via_gateway(fs: FoldSet, items: list[Ingested], out: dict) -> list:
    """(b) Through the gateway: a client process POSTs every update over HTTP; the gateway's
    body streaming writes it into a slot. Between rounds the slots are released as the leaves
    do after folding: with the default trim (pages given back: every round faults them in
    again), with the pages kept (HEARTH_POOL_TRIM=off: rounds 2+ don't), and once trimmed then
    pre-faulted (SlotPool.prefault). Returns the last round's slots (what the contenders fold)."""
    pool, nbytes, slot_size = fs.pool, fs.nbytes, fs.slot_size
    spec = [(it.slot.index, it.slot.gen, len(it.view)) for it in items]

    def trimmed(prev: list) -> None:
        release_all(pool, prev, DEFAULT_TRIM_THRESHOLD)

    def kept(prev: list) -> None:
        release_all(pool, prev, TRIM_OFF)

    def prefaulted(prev: list) -> dict:
        release_all(pool, prev, DEFAULT_TRIM_THRESHOLD)
        t = time.perf_counter()
        populated = pool.prefault(slot_size)
        return {"prefault_s": time.perf_counter() - t, "prefault_bytes": populated}

    first = [it.slot for it in items]  # the client copies them first, then they are freed
    rounds = [
        ("round1", lambda prev: trimmed(first)),  # fresh pages
        ("round2_default_trim", trimmed),  # pages given back on release: fresh again
        ("round2plus_pages_kept", kept),  # HEARTH_POOL_TRIM=off: steady state
        ("round1_after_prefault", prefaulted),  # trimmed, then pool.prefault(slot class)
        ("round2plus_final", kept),  # the slots the contenders fold
    ]
    ing, final = asyncio.run(http_ingest_rounds(pool, spec, rounds))
    for r in ing:
        r["gbps"] = nbytes / r["s"] / GB
        out[f"ingest_{r['label']}"] = r
        print(
            f"  ingestion via gateway HTTP  {r['label']:<22} {r['s']:7.3f} s  {r['gbps']:6.2f} GB/s"
            f"  (gateway body->slot {r['gateway_read_s']:6.3f} s)"
            + (
                f"  prefault {r['prefault_s']:.3f} s for {r['prefault_bytes'] / GB:.2f} GB"
                if "prefault_s" in r
                else ""
            ),
            flush=True,
        )
    out["ingest_round1_gbps"] = out["ingest_round1"]["gbps"]
    out["ingest_round2plus_gbps"] = max(
        out["ingest_round2plus_pages_kept"]["gbps"], out["ingest_round2plus_final"]["gbps"]
    )
    out["ingest_round2_default_trim_gbps"] = out["ingest_round2_default_trim"]["gbps"]
    out["ingest_after_prefault_gbps"] = out["ingest_round1_after_prefault"]["gbps"]
    return final


def leaf_read(fs: FoldSet, final: list, out: dict) -> None:
    """A leaf in another process reading this round's slots: first access vs pages kept."""
    nbytes = fs.nbytes
    final_spec = [(p.slot.index, p.slot.gen, p.offset + p.length) for p in final]
    rd = json.loads(
        subprocess.run(
            [sys.executable, SCRIPT, "--read-slots", fs.pool.name] + [json.dumps(final_spec)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    out["leaf_read_first_access_gbps"] = nbytes / rd[0] / GB
    out["leaf_read_pages_kept_gbps"] = nbytes / rd[1] / GB
    print(
        f"  leaf in another process reading the slots: first access (maps the pages; every "
        f"round if trimmed) {rd[0]:6.3f} s {out['leaf_read_first_access_gbps']:5.2f} GB/s; "
        f"pages kept {rd[1]:6.3f} s {out['leaf_read_pages_kept_gbps']:5.2f} GB/s",
        flush=True,
    )
