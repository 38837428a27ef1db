"""One set of the fold benchmark, stage by stage: ingestion, the contenders, the references."""

from __future__ import annotations

import gc
import time

import numpy as np

from fedavg import fold_contenders as contenders
from fedavg import ingest
from fedavg.fold_figures import derive, report
from fedavg.fold_inputs import FoldSet, Updates, open_set, updates_in_slots
from fedavg.procfs import Peak
from fedavg.sizes import GB


def exact_check(fs: FoldSet, ups: Updates, ref_model: list, out: dict) -> None:
    """The tree's model vs float64 FedAvg, on a sample of elements."""
    params, flat, counts = fs.params, ups.flat, fs.counts
    idx = np.linspace(0, params - 1, 4096).astype(np.int64)
    exact = sum(f[idx].astype(np.float64) * n for f, n in zip(flat, counts, strict=True)) / sum(
        counts
    )
    mine = np.concatenate([a.ravel() for a in ref_model])[idx]
    out["max_rel_err_vs_exact"] = float(np.max(np.abs(mine - exact) / np.abs(exact)))


def bare_add_pass(fs: FoldSet, ups: Updates, out: dict, repeat: int) -> None:
    """The bare ``np.add(out=)`` pass: reads the update, reads and writes the accumulator."""
    nbytes, flat = fs.nbytes, ups.flat
    acc = np.zeros(fs.params, np.float32)
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


def read_pass(fs: FoldSet, ups: Updates, out: dict, repeat: int) -> None:
    """The read-only pass: every fold must read each update byte at least once."""
    nbytes = fs.nbytes
    read_s = float("inf")
    for _ in range(repeat + 1):
        t = time.perf_counter()
        for f in ups.flat:
            f.sum()  # numpy's SIMD pairwise sum: streams the update, writes nothing
        read_s = min(read_s, time.perf_counter() - t)
    out["read_pass"] = {"s": read_s, "gbps": nbytes / read_s / GB}
    print(
        f"  read-only pass (x.sum())    {read_s:7.3f} s  {nbytes / read_s / GB:6.2f} GB/s",
        flush=True,
    )


def _ingestion(fs: FoldSet, rng: np.random.Generator, out: dict) -> tuple[Updates, float, float]:
    """The updates through the gateway, into the slots the contenders read; and a round's
    ingestion time, rounds 2+ and round 1."""
    items = ingest.slot_write_alone(fs, rng, out)
    final = ingest.via_gateway(fs, items, out)
    ingest.leaf_read(fs, final, out)
    ingest_s = fs.nbytes / out["ingest_round2plus_gbps"] / GB
    ingest1_s = out["ingest_round1"]["s"]
    return updates_in_slots(fs, items, final), ingest_s, ingest1_s


def _contenders(fs: FoldSet, ups: Updates, out: dict, threads: int, repeat: int) -> tuple:
    """Every contender over the same slots; the tree's and the single aggregator's figures and
    the tree's model."""
    tree, one, ref_model = contenders.interleaved(fs, ups, out, threads, repeat)
    fitres = contenders.fitres_of(fs, ups)
    contenders.flower_inplace(fs, fitres, out, repeat)
    contenders.strategies(fs, fitres, out, repeat)
    del fitres
    gc.collect()
    return tree, one, ref_model


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
    """One set in this process: every figure of it (see ``fedavg_vs_flower.py``)."""
    fs, rng = open_set(name, nclients, params, nlayers, fan_in, seed)
    nbytes = fs.nbytes
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
        ups, ingest_s, ingest1_s = _ingestion(fs, rng, out)
        tree, one, ref_model = _contenders(fs, ups, out, threads, repeat)
        exact_check(fs, ups, ref_model, out)
        bare_add_pass(fs, ups, out, repeat)
        read_pass(fs, ups, out, repeat)
        derive(out, tree, one, ingest_s, ingest1_s, fan_in)
        print(report(out), flush=True)
        slots = ups.slots
        ups = None  # drop the views before the pool goes away
        for s in slots:
            try:
                s.release()
            except Exception:  # noqa: BLE001
                pass
    finally:
        gc.collect()
        fs.pool.destroy()
    return out
