"""Hearth fedavg vs Flower's aggregate() / aggregate_inplace() on the same updates, in one run.

Sets: 32 x 11.21 M params (ResNet-18) and 8 x 58.27 M (ResNet-152); ``--quick``: 8 x 11.21 M and
4 x 58.27 M. Every update is written once into a real shared-memory slot (hearth.dataplane
SlotPool) -- the gateway's ingestion, timed separately -- and all contenders read those same
bytes: Hearth folds them in place; Flower's aggregate() gets numpy views of them; Flower's
aggregate_inplace() gets FitRes messages serialised from them (its real input type).

Per contender: seconds, GB/s of update bytes, peak RSS growth (VmHWM reset before each run), and
ratios against Flower aggregate(). The bare ``np.add(out=)`` pass over the same bytes is the
single-core memory-bandwidth reference. Hearth is measured cold (round 1: accumulators are
allocated and first touched) and warm (rounds 2+: same aggregators, no allocation), two ways:
the tree (fan-in 4, leaves -> middle -> top with promotion) receiving the updates as a burst
(queued updates are folded in grouped passes: the accumulator is read and written once per 4
updates), and one aggregator folding strictly one update at a time. Contenders are interleaved
and each keeps its best run (the shared machine's load changes by the second).

Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import uuid

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
from hearth.dataplane.shm import SlotPool
from hearth.functions.fedavg.aggregation import Aggregation
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
    accs = 2 * len(plan_tree_.roles) + 2 + 4  # tree + flat accumulators + kept models
    pool = SlotPool.create(
        f"hearth-fedavg-bench-{uuid.uuid4().hex[:8]}", [(1 << 16, 64), (slot_size, nclients + accs)]
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
        # -- ingestion: each client's arrays are written once into a slot ---------------------
        ingest_s = 0.0
        holder = Aggregation(plan_tree_, pool=pool)  # its ingest() is the gateway's write
        holder.start_round(1)
        items = []
        for i in range(nclients):
            client = [
                (f"layer{j}", rng.random(s, dtype=np.float32) + 0.5) for j, s in enumerate(shapes)
            ]
            t = time.perf_counter()
            items.append(holder.ingest(client, counts[i], client=f"c{i}"))
            ingest_s += time.perf_counter() - t
            del client
        holder.round = None
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
        out["ingest_s"] = ingest_s
        out["ingest_gbps"] = nbytes / ingest_s / GB
        print(
            f"  ingestion into slots        {ingest_s:7.3f} s  {nbytes / ingest_s / GB:6.2f} GB/s",
            flush=True,
        )

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
                prev = self.res.get(kind)
                self.res[kind] = {
                    "s": min(pk.seconds, prev["s"]) if prev else pk.seconds,
                    "rss_mb": max(pk.mb, prev["rss_mb"]) if prev else pk.mb,
                    "new_accumulators": new + (prev["new_accumulators"] if prev else 0),
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
                self.res["peak_models_per_aggregator"] = max(agg.meter.peak.values()) / (params * 4)
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
            best = out.get("flower_aggregate")
            if best is None:
                out["flower_aggregate_first"] = {
                    "s": pk.seconds,
                    "gbps": nbytes / pk.seconds / GB,
                    "rss_mb": pk.mb,
                }
            if best is None or pk.seconds < best["s"]:
                out["flower_aggregate"] = {
                    "s": pk.seconds,
                    "gbps": nbytes / pk.seconds / GB,
                    "rss_mb": max(pk.mb, best["rss_mb"] if best else 0),
                }
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

        out["hearth_tree"] = tree
        out["hearth_one"] = one
        base = out["flower_aggregate"]["s"]
        out["ratio_tree_warm_vs_flower"] = base / tree["warm"]["s"]
        out["ratio_tree_cold_vs_flower"] = base / tree["cold"]["s"]
        out["ratio_tree_warm_vs_flower_first_call"] = (
            out["flower_aggregate_first"]["s"] / tree["warm"]["s"]
        )
        out["ratio_one_warm_vs_flower"] = base / one["warm"]["s"]
        out["ratio_tree_warm_vs_flower_inplace"] = (
            out["flower_aggregate_inplace"]["s"] / tree["warm"]["s"]
        )
        out["ratio_tree_total_vs_flower"] = base / (tree["warm"]["s"] + ingest_s)
        out["tree_warm_fraction_of_bandwidth"] = tree["warm"]["gbps"] / out["bare_add"]["gbps"]
        print(
            f"  ratios vs flower aggregate() (its best run): tree warm {out['ratio_tree_warm_vs_flower']:.1f}x "
            f"(vs its first call {out['ratio_tree_warm_vs_flower_first_call']:.1f}x), cold {out['ratio_tree_cold_vs_flower']:.1f}x, "
            f"1 aggregator {out['ratio_one_warm_vs_flower']:.1f}x, incl. ingestion {out['ratio_tree_total_vs_flower']:.1f}x; "
            f"vs aggregate_inplace() {out['ratio_tree_warm_vs_flower_inplace']:.1f}x; "
            f"HearthFedAvg vs FedAvg.aggregate_fit {out['ratio_strategy_hearth_vs_flower']:.1f}x; "
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="8 x ResNet-18 and 4 x ResNet-152 (about a minute)"
    )
    ap.add_argument("--fan-in", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs per contender; the best is kept (the load is noisy)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="fold threads per aggregator in the tree run"
    )
    a = ap.parse_args(argv)
    sets = [
        ("resnet18", 8 if a.quick else 32, R18, 62),
        ("resnet152", 4 if a.quick else 8, R152, 465),
    ]
    print(
        f"fedavg vs Flower ({'quick' if a.quick else 'full'}); pid {os.getpid()}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    results = [
        run_set(n, c, p, nl, a.fan_in, a.seed + i, a.threads, a.repeat)
        for i, (n, c, p, nl) in enumerate(sets)
    ]
    summary = {
        "benchmark": "fedavg_vs_flower",
        "quick": a.quick,
        "fan_in": a.fan_in,
        "loadavg": os.getloadavg()[0],
    }
    for r in results:
        k = r["set"]
        for key in (
            "ingest_gbps",
            "ratio_tree_warm_vs_flower",
            "ratio_tree_cold_vs_flower",
            "ratio_one_warm_vs_flower",
            "ratio_tree_warm_vs_flower_inplace",
            "ratio_tree_warm_vs_flower_first_call",
            "ratio_strategy_hearth_vs_flower",
            "ratio_tree_total_vs_flower",
            "tree_warm_fraction_of_bandwidth",
            "max_rel_err_vs_flower",
            "max_rel_err_vs_exact",
        ):
            summary[f"{k}_{key}"] = round(r[key], 7 if "err" in key else 3)
        summary[f"{k}_clients"] = r["clients"]
        summary[f"{k}_flower_aggregate_gbps"] = round(r["flower_aggregate"]["gbps"], 3)
        summary[f"{k}_flower_aggregate_rss_mb"] = round(r["flower_aggregate"]["rss_mb"], 1)
        summary[f"{k}_flower_inplace_gbps"] = round(r["flower_aggregate_inplace"]["gbps"], 3)
        summary[f"{k}_flower_inplace_rss_mb"] = round(r["flower_aggregate_inplace"]["rss_mb"], 1)
        summary[f"{k}_bare_add_gbps"] = round(r["bare_add"]["gbps"], 3)
        for v in ("tree", "one"):
            h = r[f"hearth_{v}"]
            summary[f"{k}_hearth_{v}_warm_s"] = round(h["warm"]["s"], 4)
            summary[f"{k}_hearth_{v}_warm_gbps"] = round(h["warm"]["gbps"], 3)
            summary[f"{k}_hearth_{v}_cold_gbps"] = round(h["cold"]["gbps"], 3)
            summary[f"{k}_hearth_{v}_warm_rss_mb"] = round(h["warm"]["rss_mb"], 1)
            summary[f"{k}_hearth_{v}_cold_rss_mb"] = round(h["cold"]["rss_mb"], 1)
            summary[f"{k}_hearth_{v}_new_accumulators_round2"] = h["warm"]["new_accumulators"]
        summary[f"{k}_hearth_tree_peak_models_per_aggregator"] = round(
            r["hearth_tree"]["peak_models_per_aggregator"], 3
        )
    # the target: >= 5x Flower aggregate() throughput. Flower's figure depends on whether
    # its allocator is warm (2nd call in a loop reuses the 2N+1 freed models), so both are given
    summary["target_5x_met"] = all(r["ratio_tree_warm_vs_flower"] >= 5 for r in results)
    summary["target_5x_vs_flower_first_call_met"] = all(
        r["ratio_tree_warm_vs_flower_first_call"] >= 5 for r in results
    )
    summary["target_5x_vs_flower_inplace_met"] = all(
        r["ratio_tree_warm_vs_flower_inplace"] >= 5 for r in results
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
