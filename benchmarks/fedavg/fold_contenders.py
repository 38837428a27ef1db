"""The fold benchmark's contenders, each over the same updates in their slots.

Hearth folds them in place, as the tree (fan-in 4, leaves -> middle -> top with promotion)
receiving a burst and as one aggregator folding one update at a time; Flower's aggregate() gets
numpy views of them, its aggregate_inplace() and the strategies FitRes messages serialised from
them. Each keeps its best run (the load is noisy).
"""

from __future__ import annotations

import gc

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
from hearth.functions.fedavg.aggregation import Aggregation
from hearth.functions.fedavg.flower import HearthFedAvg
from hearth.functions.fedavg.pack import Header, write_header
from hearth.functions.fedavg.tree import plan_tree

from fedavg.fold_inputs import FoldSet, Updates
from fedavg.procfs import Peak, children
from fedavg.sizes import GB


class HearthRun:
    """One warm aggregation tree; each run() is a round over the same slots."""

    def __init__(
        self, fs: FoldSet, ups: Updates, label: str, plan, threads: int = 1, burst: bool = False
    ):
        self.fs, self.ups = fs, ups
        self.label, self.plan, self.burst = label, plan, burst
        self.agg = Aggregation(plan, pool=fs.pool, keep=1, threads=threads)
        self.res: dict = {}
        self.rid = 0
        self.model = None

    def run(self) -> None:
        fs, items = self.fs, self.ups.items
        nbytes = fs.nbytes
        self.rid += 1
        rid, agg = self.rid, self.agg
        for i, it in enumerate(items):
            write_header(
                it.view,
                Header("update", fs.counts[i], fs.layout, rid, f"c{i}"),
                data_off=self.ups.data_off[i],
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
        model_b = self.fs.params * 4
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


class FlowerAggregate:
    """Flower's aggregate() on numpy views of the slots. Its first call in the process and its
    repeated calls (glibc then hands back the models the previous call freed) are kept apart."""

    def __init__(self, fs: FoldSet, ups: Updates, out: dict):
        self.fs, self.ups, self.out = fs, ups, out
        self.result: list[np.ndarray] | None = None  # the last call's model

    def run(self) -> None:
        nbytes, out = self.fs.nbytes, self.out
        self.result = None  # freed first, as a repeated call in a Flower server would
        gc.collect()
        with Peak() as pk:
            fl = aggregate([(v, n) for v, n in zip(self.ups.views, self.fs.counts, strict=True)])
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
        self.result = fl


def interleaved(
    fs: FoldSet, ups: Updates, out: dict, threads: int, repeat: int
) -> tuple[dict, dict, list]:
    """Hearth's tree and single aggregator, and Flower's aggregate(), interleaved (ABAB...): the
    machine's load changes by the second, so each contender gets several chances and keeps its
    best run. Returns the tree's and the single aggregator's figures and the tree's model."""
    tree_run = HearthRun(fs, ups, f"tree k={fs.fan_in}", fs.plan, threads, burst=True)
    one_run = HearthRun(
        fs, ups, "1 agg 1-by-1", plan_tree(fs.nclients, fan_in=max(2, fs.nclients), levels=1)
    )
    flower = FlowerAggregate(fs, ups, out)
    tree_run.run()
    one_run.run()
    for _ in range(repeat):
        tree_run.run()
        one_run.run()
        flower.run()
    tree, ref_model = tree_run.finish()
    one, _ = one_run.finish()
    fl, flower.result = flower.result, None
    gc.collect()
    err = max(
        float(np.max(np.abs(a.astype(np.float64) - b) / np.abs(b)))
        for a, b in zip(ref_model, fl, strict=True)
    )
    out["max_rel_err_vs_flower"] = err
    del fl
    gc.collect()
    return tree, one, ref_model


def fitres_of(fs: FoldSet, ups: Updates) -> list:
    """FitRes messages serialised from the same arrays (what a Flower server receives)."""
    return [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(v), n, {}))
        for v, n in zip(ups.views, fs.counts, strict=True)
    ]


def flower_inplace(fs: FoldSet, fitres: list, out: dict, repeat: int) -> None:
    """Flower's aggregate_inplace() on the FitRes messages (it deserialises them)."""
    nbytes = fs.nbytes
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


def strategies(fs: FoldSet, fitres: list, out: dict, repeat: int) -> None:
    """The strategy level, what a Flower user runs: FedAvg.aggregate_fit vs HearthFedAvg; both
    take the same FitRes list and return serialised Parameters."""
    nbytes = fs.nbytes
    quiet = {"fit_metrics_aggregation_fn": lambda m: {}}  # no per-round metrics warning
    contenders = {
        "flower FedAvg": FedAvg(**quiet),
        "HearthFedAvg": HearthFedAvg(fan_in=fs.fan_in, **quiet),
    }
    strat_best: dict[str, float] = {}
    for _ in range(repeat):
        for label, strat in contenders.items():
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
