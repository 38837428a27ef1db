"""Hearth fedavg vs Flower's aggregate() / aggregate_inplace() on the same updates, in one run.

Sets: 32 x 11.21 M params (ResNet-18) and 8 x 58.27 M (ResNet-152); ``--quick``: 8 x 11.21 M and
4 x 58.27 M.

Ingestion, timed apart from aggregation, per round: (a) the gateway's slot write alone, in process
(pack into a slot with fresh tmpfs pages = round 1, then into the same slot released with its
pages kept = rounds 2+); (b) through the gateway's HTTP path: a client process POSTs every update
over loopback TCP to an aiohttp server running the gateway's own body streaming
(``hearth.gateway.body._read_into_slot``: socket -> slot). Between HTTP rounds the slots are
released as the leaves release them after folding: with the platform's default trim (slots >=
16 MiB give their pages back, so every round faults them in again), with pages kept
(``HEARTH_POOL_TRIM=off``), and trimmed then ``SlotPool.prefault``-ed. The slots of the last
round are what every contender reads: Hearth folds them in place; Flower's aggregate() gets numpy
views of them; Flower's aggregate_inplace() gets FitRes messages serialised from them.

Per contender: seconds, GB/s of update bytes, peak RSS growth (VmHWM reset before each run).
Hearth is measured cold (round 1: accumulators allocated and first touched) and warm (rounds 2+:
same aggregators), as the tree (fan-in 4, leaves -> middle -> top with promotion) receiving a
burst (queued updates folded 4 per pass) and as one aggregator folding one update at a time.
Flower's aggregate() is reported for its first call in the process and, separately, for its
repeated calls (glibc then hands back the models the previous call freed: no page faults), and
the 5x target is checked against each (``target_5x_vs_first_call``,
``target_5x_vs_repeated_call``). Physical references, same run: the bare ``np.add(out=)`` pass
(reads the update, reads and writes the accumulator) and a read-only pass (``x.sum()``: every
fold must read each update byte at least once); ``warm_5x_needs_gbps`` is what 5x the repeated
call would need. Checked figures (exit status 1 if one fails): peak model-sized buffers per
aggregator <= fan-in + 2, no new accumulator and no process started after round 1 (in-process
here; on the platform the same pids serving round 2 are checked by
tests/functions/test_fedavg_e2e.py and, with ``--platform``, here). Contenders are interleaved
and keep their best run; each set runs in a fresh process (Flower's first call is the first).

``--platform`` adds 4 rounds of 8 updates x 3.9 M params on a real ``hearth up`` node (gateway,
node agent, proxy daemon, one process per aggregator), slot trim default vs off: per-round GB/s
and process starts after round 1 from the instances' pids.

Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
from aiohttp import web
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
from hearth.dataplane.shm import DEFAULT_TRIM_THRESHOLD, TRIM_OFF, SlotPool
from hearth.functions.fedavg.aggregation import Aggregation, Ingested
from hearth.functions.fedavg.flower import HearthFedAvg
from hearth.functions.fedavg.pack import (
    PREFIX,
    Header,
    LayerSpec,
    Layout,
    packed_size,
    write_header,
)
from hearth.functions.fedavg.tree import plan_tree
from hearth.gateway.body import _read_into_slot  # the gateway's body -> slot streaming

GB = 1e9
R18, R152 = 11_210_000, 58_270_000


def layer_shapes(total: int, nlayers: int, seed: int) -> list[tuple[int, ...]]:
    """A ResNet-like list of layer sizes summing exactly to ``total``."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(nlayers, 0.6))
    sizes = np.maximum(1, (w * total).astype(np.int64))
    sizes[int(np.argmax(sizes))] += total - int(sizes.sum())
    return [(int(s),) for s in sizes]


def rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class Peak:
    """Peak RSS growth over a block (VmHWM after a reset, minus RSS at the start)."""

    def __enter__(self) -> Peak:
        gc.collect()
        rss_reset()
        self.base = rss_kb("VmRSS:")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.mb = max(0, rss_kb("VmHWM:") - self.base) / 1024


# -- ingestion through the gateway's HTTP path ------------------------------------------------
# A client process POSTs each packed update over loopback TCP to an aiohttp server whose handler
# is the gateway's own body streaming (hearth.gateway.body._read_into_slot: socket -> slot, one
# copy). The descriptor the gateway then sends is 64 bytes (~12 us per hop, docs/dataplane.md).


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
        os.path.abspath(__file__),
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


def platform_rounds(trim: str, nclients: int, params: int, rounds: int, fan_in: int) -> dict:
    """Rounds on a real node (``hearth up``: gateway, node agent, proxy daemon, one process per
    aggregator): each client's packed update is POSTed to its leaf, which folds it from the slot
    and forwards its partial to the top. ``trim``: "default" (slots >= 16 MiB give their pages
    back on release) or "off" (``HEARTH_POOL_TRIM=off``). Per round: wall time of the POSTs
    (pre-packed bodies), and the pids of the tree's instances (a new pid = a process start)."""
    import tempfile

    from hearth.functions.fedavg import client as flc
    from hearth.functions.fedavg.pack import pack
    from hearth.localnode import start_node

    tmp = tempfile.mkdtemp(prefix="hfl-bench-")
    env = {
        "HEARTH_MAX_BODY_BYTES": str(256 << 20),
        "HEARTH_POOL_TRIM": "off" if trim == "off" else "",
    }
    node = start_node(tmp, env=env, client_timeout=120)  # its own private redis-server
    c = node.client
    res: dict = {"trim": trim, "rounds": []}
    try:
        plan = plan_tree({"node-0": nclients}, fan_in=fan_in, prefix=f"flbench{trim}")
        for spec in plan.function_specs(model_bytes=params * 4):
            c.deploy(spec.to_dict())
        names = [r.name for r in plan.roles]
        rng = np.random.default_rng(7)
        shapes = layer_shapes(params, 62, 7)
        models = [
            [(f"l{j}", rng.random(sh, dtype=np.float32) + 0.5) for j, sh in enumerate(shapes)]
            for _ in range(nclients)
        ]
        counts = [int(x) for x in rng.integers(100, 5000, nclients)]
        first_pids: set[int] | None = None
        for rnd in range(1, rounds + 1):
            bodies = [
                bytes(pack(m, n, round=rnd, client=f"c{i}"))
                for i, (m, n) in enumerate(zip(models, counts, strict=True))
            ]
            flc.open_round(c.url, plan, rnd)
            t = time.perf_counter()
            for i, b in enumerate(bodies):
                r = flc.invoke(
                    c.url, plan.leaf_for("node-0", i).instance, b, "application/octet-stream"
                )
                assert r.status == 200, r.body
            wall = time.perf_counter() - t
            flc.fetch(c.url, plan, rnd)  # the global model is published
            fns = c.status()["functions"]
            pids = {
                int(i["pid"])
                for n in names
                for i in (fns.get(n) or {}).get("instances", [])
                if i["state"] not in ("stopping", "dead")
            }
            if first_pids is None:
                first_pids = pids
            res["rounds"].append(
                {
                    "round": rnd,
                    "s": wall,
                    "gbps": nclients * params * 4 / wall / GB,
                    "new_pids": len(pids - first_pids),
                }
            )
            print(
                f"  platform trim={trim:<7} round {rnd}  {wall:7.3f} s  "
                f"{nclients * params * 4 / wall / GB:6.2f} GB/s  instances {sorted(pids)}",
                flush=True,
            )
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    later = res["rounds"][1:]
    res["round1_gbps"] = res["rounds"][0]["gbps"]
    res["round2plus_gbps"] = max(r["gbps"] for r in later)
    res["process_starts_after_round1"] = sum(r["new_pids"] for r in later)
    return res


def children() -> set[int]:
    """Child processes of this process (all threads)."""
    out: set[int] = set()
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/children") as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def run_set(
    name: str,
    nclients: int,
    params: int,
    nlayers: int,
    fan_in: int,
    seed: int,
    threads: int = 1,
    repeat: int = 2,
) -> dict:
    nbytes = nclients * params * 4
    shapes = layer_shapes(params, nlayers, seed)
    layout = Layout(
        tuple(LayerSpec(f"layer{i}", np.dtype(np.float32), s) for i, s in enumerate(shapes))
    )
    slot_size = (
        -(-(packed_size(Header("update", 10**9, layout, 10**6, "c" * 16)) + 4096) // 4096) * 4096
    )
    plan_tree_ = plan_tree(nclients, fan_in=fan_in)
    # one slot per update (+2 spare); accumulators and kept models live in private memory
    pool = SlotPool.create(
        f"hearth-fedavg-bench-{uuid.uuid4().hex[:8]}",
        [(1 << 16, 64), (slot_size, nclients + 2)],
        trim_threshold=DEFAULT_TRIM_THRESHOLD,  # the platform's default; rounds below vary it
    )
    rng = np.random.default_rng(seed)
    counts = [int(x) for x in rng.integers(100, 5000, nclients)]
    out: dict = {
        "set": name,
        "clients": nclients,
        "params": params,
        "layers": nlayers,
        "update_gb": nbytes / GB,
    }
    print(
        f"\n== {name}: {nclients} updates x {params / 1e6:.2f} M params ({nbytes / GB:.2f} GB), {nlayers} layers ==",
        flush=True,
    )
    try:
        # -- ingestion ---------------------------------------------------------------------------
        # (a) the gateway's slot write alone (in process): each client's arrays packed into a
        #     slot with fresh tmpfs pages (round 1), then again into the same slot, released with
        #     its pages kept (rounds 2+).
        holder = Aggregation(plan_tree_, pool=pool)  # its ingest() is the gateway's write
        holder.start_round(1)
        write_s = {"round1": 0.0, "round2plus": 0.0}
        items = []
        for i in range(nclients):
            client = [
                (f"layer{j}", rng.random(s, dtype=np.float32) + 0.5) for j, s in enumerate(shapes)
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

        # (b) through the gateway: a client process POSTs every update over HTTP; the gateway's
        #     body streaming writes it into a slot. Between rounds the slots are released as the
        #     leaves do after folding: with the default trim (pages given back: every round
        #     faults them in again), with the pages kept (HEARTH_POOL_TRIM=off: rounds 2+ don't),
        #     and once trimmed then pre-faulted (SlotPool.prefault).
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
        # a leaf in another process reading this round's slots: first access vs pages kept
        final_spec = [(p.slot.index, p.slot.gen, p.offset + p.length) for p in final]
        rd = json.loads(
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--read-slots", pool.name]
                + [json.dumps(final_spec)],
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
        ingest_s = nbytes / out["ingest_round2plus_gbps"] / GB
        ingest1_s = out["ingest_round1"]["s"]
        items = [
            Ingested(p.slot.buf[p.offset : p.offset + p.length], it.node, it.client, p.slot)
            for it, p in zip(items, final, strict=True)
        ]
        slots = [it.slot for it in items]
        data_off = [PREFIX.unpack_from(it.view, 0)[4] for it in items]
        flat = [
            np.frombuffer(it.view, np.float32, count=params, offset=d)
            for it, d in zip(items, data_off, strict=True)
        ]
        views = [
            [
                f[o : o + s[0]]
                for o, s in zip(np.cumsum([0] + [s[0] for s in shapes[:-1]]), shapes, strict=True)
            ]
            for f in flat
        ]

        class HearthRun:
            """One warm aggregation tree; each run() is a round over the same slots."""

            def __init__(self, label: str, plan, threads: int = 1, burst: bool = False):
                self.label, self.plan, self.burst = label, plan, burst
                self.agg = Aggregation(plan, pool=pool, keep=1, threads=threads)
                self.res: dict = {}
                self.rid = 0
                self.model = None

            def run(self) -> None:
                self.rid += 1
                rid, agg = self.rid, self.agg
                for i, it in enumerate(items):
                    write_header(
                        it.view,
                        Header("update", counts[i], layout, rid, f"c{i}"),
                        data_off=data_off[i],
                    )
                    it.slot = None  # the update slots are reused by every contender
                created = sum(a.accumulators_created for a in agg.aggs.values())
                kids = children()
                agg.start_round(rid)
                with Peak() as pk:
                    if self.burst:  # all updates are queued: leaves fold them in grouped passes
                        errs = agg.submit_many(items)
                        assert not any(errs), errs
                    else:  # strictly one update at a time, in arrival order
                        for it in items:
                            agg.submit(it)
                    self.model = agg.model(rid)
                kind = "cold" if rid == 1 else "warm"
                new = sum(a.accumulators_created for a in agg.aggs.values()) - created
                procs = len(children() - kids)
                prev = self.res.get(kind)
                self.res[kind] = {
                    "s": min(pk.seconds, prev["s"]) if prev else pk.seconds,
                    "rss_mb": max(pk.mb, prev["rss_mb"]) if prev else pk.mb,
                    "new_accumulators": new + (prev["new_accumulators"] if prev else 0),
                    "process_starts": procs + (prev["process_starts"] if prev else 0),
                }
                self.res[kind]["gbps"] = nbytes / self.res[kind]["s"] / GB
                print(
                    f"  hearth {self.label:<12} r{rid} {kind} {pk.seconds:7.3f} s  {nbytes / pk.seconds / GB:6.2f} GB/s  RSS +{pk.mb:7.1f} MB  new accumulators {new}",
                    flush=True,
                )

            def finish(self) -> tuple[dict, list]:
                agg = self.agg
                self.res["levels"] = self.plan.levels
                self.res["aggregators"] = len(self.plan.roles)
                self.res["promotions"] = len(agg.promotions)
                model_b = params * 4
                # peak model-sized buffers alive at once per aggregator: accumulators + inputs held
                # (+ for the top the published model it keeps, keep=1 here: reported apart, as in
                # tests/functions/test_fedavg_core.py). Buffers carry a header (< 0.01 model).
                self.res["peak_models_per_aggregator"] = max(agg.meter.peak.values()) / model_b
                self.res["peak_working_models_per_aggregator"] = max(
                    (v - (model_b if n == self.plan.top.name else 0)) / model_b
                    for n, v in agg.meter.peak.items()
                )
                model = [a.copy() for _, a in self.model.layers]
                agg.close()
                self.agg = None
                return self.res, model

        def flower_aggregate() -> None:
            gc.collect()
            with Peak() as pk:
                fl = aggregate([(v, n) for v, n in zip(views, counts, strict=True)])
            print(
                f"  flower aggregate()          {pk.seconds:7.3f} s  {nbytes / pk.seconds / GB:6.2f} GB/s  RSS +{pk.mb:7.1f} MB",
                flush=True,
            )
            rec = {"s": pk.seconds, "gbps": nbytes / pk.seconds / GB, "rss_mb": pk.mb}
            if "flower_aggregate_first" not in out:  # the first call in this process
                out["flower_aggregate_first"] = rec
            else:  # repeated calls: glibc hands back the models the previous call freed
                best = out.get("flower_aggregate_repeated")
                if best is None or rec["s"] < best["s"]:
                    rec["rss_mb"] = max(rec["rss_mb"], best["rss_mb"] if best else 0)
                    out["flower_aggregate_repeated"] = rec
                else:
                    best["rss_mb"] = max(best["rss_mb"], pk.mb)
            out["_flower_result"] = fl

        # interleaved (ABAB...): the machine's load changes by the second, so each contender gets
        # several chances and keeps its best run
        tree_run = HearthRun(f"tree k={fan_in}", plan_tree_, threads, burst=True)
        one_run = HearthRun("1 agg 1-by-1", plan_tree(nclients, fan_in=max(2, nclients), levels=1))
        tree_run.run()
        one_run.run()
        for _ in range(repeat):
            tree_run.run()
            one_run.run()
            out.pop("_flower_result", None)
            flower_aggregate()
        tree, ref_model = tree_run.finish()
        one, _ = one_run.finish()
        fl = out.pop("_flower_result")
        gc.collect()
        err = max(
            float(np.max(np.abs(a.astype(np.float64) - b) / np.abs(b)))
            for a, b in zip(ref_model, fl, strict=True)
        )
        out["max_rel_err_vs_flower"] = err
        del fl
        gc.collect()

        # -- Flower aggregate_inplace(): FitRes messages serialised from the same arrays -------
        fitres = [
            (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(v), n, {}))
            for v, n in zip(views, counts, strict=True)
        ]
        best = None
        for _ in range(repeat):
            fl = None
            gc.collect()
            with Peak() as pk:
                fl = aggregate_inplace(fitres)
            print(
                f"  flower aggregate_inplace()  {pk.seconds:7.3f} s  {nbytes / pk.seconds / GB:6.2f} GB/s  RSS +{pk.mb:7.1f} MB  (incl. deserialising FitRes)",
                flush=True,
            )
            if best is None or pk.seconds < best["s"]:
                best = {"s": pk.seconds, "rss_mb": max(pk.mb, best["rss_mb"] if best else 0)}
        best["gbps"] = nbytes / best["s"] / GB
        out["flower_aggregate_inplace"] = best
        del fl
        gc.collect()

        # -- strategy level, what a Flower user runs: FedAvg.aggregate_fit vs HearthFedAvg ------
        # both take the same FitRes list and return serialised Parameters
        quiet = {"fit_metrics_aggregation_fn": lambda m: {}}  # no per-round metrics warning
        strategies = {
            "flower FedAvg": FedAvg(**quiet),
            "HearthFedAvg": HearthFedAvg(fan_in=fan_in, **quiet),
        }
        strat_best: dict[str, float] = {}
        for _ in range(repeat):
            for label, strat in strategies.items():
                gc.collect()
                with Peak() as pk:
                    params_out, _ = strat.aggregate_fit(1, fitres, [])
                del params_out
                strat_best[label] = min(strat_best.get(label, 1e9), pk.seconds)
                print(
                    f"  {label + '.aggregate_fit()':<27} {pk.seconds:7.3f} s  {nbytes / pk.seconds / GB:6.2f} GB/s  RSS +{pk.mb:7.1f} MB",
                    flush=True,
                )
        out["strategy_flower_s"] = strat_best["flower FedAvg"]
        out["strategy_hearth_s"] = strat_best["HearthFedAvg"]
        out["ratio_strategy_hearth_vs_flower"] = (
            strat_best["flower FedAvg"] / strat_best["HearthFedAvg"]
        )
        del strategies, fitres
        gc.collect()

        # -- exact check on a sample of elements (float64) ------------------------------------
        idx = np.linspace(0, params - 1, 4096).astype(np.int64)
        exact = sum(f[idx].astype(np.float64) * n for f, n in zip(flat, counts, strict=True)) / sum(
            counts
        )
        mine = np.concatenate([a.ravel() for a in ref_model])[idx]
        out["max_rel_err_vs_exact"] = float(np.max(np.abs(mine - exact) / np.abs(exact)))

        # -- bare bandwidth pass --------------------------------------------------------------
        acc = np.zeros(params, np.float32)
        np.add(acc, flat[0], out=acc)  # touch the pages first
        bare_s = float("inf")
        for _ in range(repeat + 1):
            with Peak() as pk:
                for f in flat:
                    np.add(acc, f, out=acc)
            bare_s = min(bare_s, pk.seconds)
        out["bare_add"] = {"s": bare_s, "gbps": nbytes / bare_s / GB}
        pk.seconds = bare_s
        print(
            f"  bare np.add(out=) pass      {pk.seconds:7.3f} s  {nbytes / pk.seconds / GB:6.2f} GB/s",
            flush=True,
        )
        del acc

        # -- read-only pass: every fold must read each update byte at least once -------------
        read_s = float("inf")
        for _ in range(repeat + 1):
            t = time.perf_counter()
            for f in flat:
                f.sum()  # numpy's SIMD pairwise sum: streams the update, writes nothing
            read_s = min(read_s, time.perf_counter() - t)
        out["read_pass"] = {"s": read_s, "gbps": nbytes / read_s / GB}
        print(
            f"  read-only pass (x.sum())    {read_s:7.3f} s  {nbytes / read_s / GB:6.2f} GB/s",
            flush=True,
        )

        out["hearth_tree"] = tree
        out["hearth_one"] = one
        first_s = out["flower_aggregate_first"]["s"]
        rep = out["flower_aggregate_repeated"]
        warm = tree["warm"]
        out["ratio_tree_warm_vs_flower_first_call"] = first_s / warm["s"]
        out["ratio_tree_warm_vs_flower_repeated_call"] = rep["s"] / warm["s"]
        out["ratio_tree_cold_vs_flower_first_call"] = first_s / tree["cold"]["s"]
        out["ratio_one_warm_vs_flower_repeated_call"] = rep["s"] / one["warm"]["s"]
        out["ratio_tree_warm_vs_flower_inplace"] = out["flower_aggregate_inplace"]["s"] / warm["s"]
        # end to end: a round's ingestion through the gateway plus the tree's fold
        out["ratio_tree_plus_ingest_round2plus_vs_flower_repeated_call"] = rep["s"] / (
            warm["s"] + ingest_s
        )
        out["ratio_tree_plus_ingest_round1_vs_flower_first_call"] = first_s / (
            warm["s"] + ingest1_s
        )
        # the bandwidth argument: what 5x Flower's repeated call would need, against what the
        # memory system moves in this run
        out["warm_5x_needs_gbps"] = 5 * rep["gbps"]
        out["bandwidth_pass_gbps"] = out["bare_add"]["gbps"]
        out["read_pass_gbps"] = out["read_pass"]["gbps"]
        out["warm_5x_exceeds_bandwidth_pass"] = (
            out["warm_5x_needs_gbps"] > out["bandwidth_pass_gbps"]
        )
        out["warm_5x_exceeds_read_pass"] = out["warm_5x_needs_gbps"] > out["read_pass_gbps"]
        out["hearth_fraction_of_bandwidth_pass"] = warm["gbps"] / out["bandwidth_pass_gbps"]
        out["hearth_fraction_of_read_pass"] = warm["gbps"] / out["read_pass_gbps"]
        out["target_5x_vs_first_call"] = out["ratio_tree_warm_vs_flower_first_call"] >= 5
        out["target_5x_vs_repeated_call"] = out["ratio_tree_warm_vs_flower_repeated_call"] >= 5
        out["check_peak_models_le_fan_in_plus_2"] = (
            tree["peak_working_models_per_aggregator"] <= fan_in + 2 + 0.01
        )
        out["check_zero_new_accumulators_after_round1"] = warm["new_accumulators"] == 0
        out["check_zero_process_starts_after_round1"] = (
            warm["process_starts"] == 0 and one["warm"]["process_starts"] == 0
        )
        print(
            f"  tree warm vs flower aggregate(): first call {out['ratio_tree_warm_vs_flower_first_call']:.1f}x, "
            f"repeated call {out['ratio_tree_warm_vs_flower_repeated_call']:.1f}x; "
            f"vs aggregate_inplace() {out['ratio_tree_warm_vs_flower_inplace']:.1f}x; "
            f"1 aggregator vs repeated call {out['ratio_one_warm_vs_flower_repeated_call']:.1f}x; "
            f"HearthFedAvg vs FedAvg.aggregate_fit {out['ratio_strategy_hearth_vs_flower']:.1f}x\n"
            f"  incl. ingestion via gateway: round 1 vs first call {out['ratio_tree_plus_ingest_round1_vs_flower_first_call']:.2f}x, "
            f"round 2+ vs repeated call {out['ratio_tree_plus_ingest_round2plus_vs_flower_repeated_call']:.2f}x\n"
            f"  bandwidth: 5x the repeated call needs {out['warm_5x_needs_gbps']:.2f} GB/s; "
            f"np.add pass {out['bandwidth_pass_gbps']:.2f} GB/s"
            f"{' (EXCEEDED)' if out['warm_5x_exceeds_bandwidth_pass'] else ''}, read-only pass "
            f"{out['read_pass_gbps']:.2f} GB/s{' (EXCEEDED)' if out['warm_5x_exceeds_read_pass'] else ''}; "
            f"hearth tree warm = {out['hearth_fraction_of_bandwidth_pass']:.2f} of the np.add pass, "
            f"{out['hearth_fraction_of_read_pass']:.2f} of the read pass\n"
            f"  target_5x_vs_first_call {out['target_5x_vs_first_call']}, "
            f"target_5x_vs_repeated_call {out['target_5x_vs_repeated_call']}; "
            f"peak {tree['peak_working_models_per_aggregator']:.3f} models/aggregator, {tree['peak_models_per_aggregator']:.3f} incl. the top's kept model "
            f"(check_peak_models_le_fan_in_plus_2 {out['check_peak_models_le_fan_in_plus_2']}); "
            f"new accumulators / process starts after round 1: {warm['new_accumulators']} / {warm['process_starts']}; "
            f"max rel err vs Flower {err:.1e}, vs exact {out['max_rel_err_vs_exact']:.1e}",
            flush=True,
        )
        flat = views = items = None  # drop the views before the pool goes away
        for s in slots:
            try:
                s.release()
            except Exception:  # noqa: BLE001
                pass
    finally:
        gc.collect()
        pool.destroy()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--http-client"]:  # the trainers' process of the ingestion measurement
        return http_client(int(argv[1]), argv[2], argv[3])
    if argv[:1] == ["--read-slots"]:  # a leaf's process reading the round's slots
        return slot_reader(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="8 x ResNet-18 and 4 x ResNet-152 (about a minute)"
    )
    ap.add_argument("--fan-in", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per contender; the best is kept (the load is noisy). Flower's aggregate() "
        "runs this often: its first call, then repeat-1 repeated calls",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="fold threads per aggregator in the tree run"
    )
    ap.add_argument(
        "--platform",
        action="store_true",
        help="also run rounds on a real `hearth up` node (needs redis-server), slot trim default "
        "vs off; 8 updates of 3.9 M params, which fit the default pool's 16 MiB slot class",
    )
    ap.add_argument("--only-set", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.repeat < 2:
        ap.error("--repeat must be >= 2 (Flower's first call and at least one repeated call)")
    sets = [
        ("resnet18", 8 if a.quick else 32, R18, 62),
        ("resnet152", 4 if a.quick else 8, R152, 465),
    ]
    if a.only_set is not None:  # one set in this (fresh) process; the parent reads the file
        n, c, p, nl = sets[a.only_set]
        r = run_set(n, c, p, nl, a.fan_in, a.seed + a.only_set, a.threads, a.repeat)
        with open(a.result_file, "w") as f:
            json.dump(r, f, default=float)
        return 0
    load0 = os.getloadavg()
    print(
        f"fedavg vs Flower ({'quick' if a.quick else 'full'}); pid {os.getpid()}; load average "
        f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    # Each set runs in a fresh process, so Flower's "first call" really is the first in its
    # process (a heap warmed by the previous set would make it a partly repeated call).
    results = []
    for i in range(len(sets)):
        with tempfile.NamedTemporaryFile(suffix=".json") as tf:
            cmd = [sys.executable, os.path.abspath(__file__), "--only-set", str(i)]
            cmd += ["--result-file", tf.name, "--fan-in", str(a.fan_in), "--seed", str(a.seed)]
            cmd += ["--repeat", str(a.repeat), "--threads", str(a.threads)]
            subprocess.run(cmd + (["--quick"] if a.quick else []), check=True)
            with open(tf.name) as f:
                results.append(json.load(f))
    summary: dict = {
        "benchmark": "fedavg_vs_flower",
        "quick": a.quick,
        "fan_in": a.fan_in,
        "loadavg_start": round(load0[0], 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
    }
    for r in results:
        k = r["set"]
        for key in (
            "ratio_tree_warm_vs_flower_first_call",
            "ratio_tree_warm_vs_flower_repeated_call",
            "ratio_tree_cold_vs_flower_first_call",
            "ratio_one_warm_vs_flower_repeated_call",
            "ratio_tree_warm_vs_flower_inplace",
            "ratio_strategy_hearth_vs_flower",
            "ratio_tree_plus_ingest_round1_vs_flower_first_call",
            "ratio_tree_plus_ingest_round2plus_vs_flower_repeated_call",
            "warm_5x_needs_gbps",
            "bandwidth_pass_gbps",
            "read_pass_gbps",
            "hearth_fraction_of_bandwidth_pass",
            "hearth_fraction_of_read_pass",
            "ingest_round1_gbps",
            "ingest_round2_default_trim_gbps",
            "ingest_round2plus_gbps",
            "ingest_after_prefault_gbps",
            "leaf_read_first_access_gbps",
            "leaf_read_pages_kept_gbps",
            "max_rel_err_vs_flower",
            "max_rel_err_vs_exact",
        ):
            summary[f"{k}_{key}"] = round(r[key], 7 if "err" in key else 3)
        for key in (
            "warm_5x_exceeds_bandwidth_pass",
            "warm_5x_exceeds_read_pass",
            "target_5x_vs_first_call",
            "target_5x_vs_repeated_call",
            "check_peak_models_le_fan_in_plus_2",
            "check_zero_new_accumulators_after_round1",
            "check_zero_process_starts_after_round1",
        ):
            summary[f"{k}_{key}"] = bool(r[key])
        summary[f"{k}_clients"] = r["clients"]
        summary[f"{k}_slot_write_round1_gbps"] = round(r["slot_write_round1"]["gbps"], 3)
        summary[f"{k}_slot_write_round2plus_gbps"] = round(r["slot_write_round2plus"]["gbps"], 3)
        summary[f"{k}_prefault_s"] = round(r["ingest_round1_after_prefault"]["prefault_s"], 3)
        for f in ("first", "repeated"):
            summary[f"{k}_flower_aggregate_{f}_call_gbps"] = round(
                r[f"flower_aggregate_{f}"]["gbps"], 3
            )
            summary[f"{k}_flower_aggregate_{f}_call_rss_mb"] = round(
                r[f"flower_aggregate_{f}"]["rss_mb"], 1
            )
        summary[f"{k}_flower_inplace_gbps"] = round(r["flower_aggregate_inplace"]["gbps"], 3)
        summary[f"{k}_flower_inplace_rss_mb"] = round(r["flower_aggregate_inplace"]["rss_mb"], 1)
        for v in ("tree", "one"):
            h = r[f"hearth_{v}"]
            summary[f"{k}_hearth_{v}_warm_s"] = round(h["warm"]["s"], 4)
            summary[f"{k}_hearth_{v}_warm_gbps"] = round(h["warm"]["gbps"], 3)
            summary[f"{k}_hearth_{v}_cold_gbps"] = round(h["cold"]["gbps"], 3)
            summary[f"{k}_hearth_{v}_warm_rss_mb"] = round(h["warm"]["rss_mb"], 1)
            summary[f"{k}_hearth_{v}_cold_rss_mb"] = round(h["cold"]["rss_mb"], 1)
            summary[f"{k}_hearth_{v}_new_accumulators_after_round1"] = h["warm"]["new_accumulators"]
            summary[f"{k}_hearth_{v}_process_starts_after_round1"] = h["warm"]["process_starts"]
        for m in ("peak_models_per_aggregator", "peak_working_models_per_aggregator"):
            summary[f"{k}_hearth_tree_{m}"] = round(r["hearth_tree"][m], 3)
    if a.platform:
        print(
            "\n== platform: 8 updates x 3.90 M params through `hearth up`, 4 rounds ==", flush=True
        )
        for trim in ("default", "off"):
            pr = platform_rounds(trim, 8, 3_900_000, 4, a.fan_in)
            summary[f"platform_trim_{trim}_round1_gbps"] = round(pr["round1_gbps"], 3)
            summary[f"platform_trim_{trim}_round2plus_gbps"] = round(pr["round2plus_gbps"], 3)
            summary[f"platform_trim_{trim}_process_starts_after_round1"] = pr[
                "process_starts_after_round1"
            ]
        summary["check_zero_platform_process_starts_after_round1"] = all(
            summary[f"platform_trim_{t}_process_starts_after_round1"] == 0
            for t in ("default", "off")
        )
    # The target: >= 5x Flower aggregate() throughput. Flower's time depends on whether
    # its allocator is warm (a repeated call reuses the 2N+1 models the previous call freed), so
    # the target is reported against both calls, never against a mix.
    for t in ("target_5x_vs_first_call", "target_5x_vs_repeated_call"):
        summary[t] = all(r[t] for r in results)
    for c in (
        "check_peak_models_le_fan_in_plus_2",
        "check_zero_new_accumulators_after_round1",
        "check_zero_process_starts_after_round1",
    ):
        summary[c] = all(r[c] for r in results)
    print(json.dumps(summary))
    return 0 if all(summary[c] for c in summary if c.startswith("check_")) else 1


if __name__ == "__main__":
    sys.exit(main())
