"""``hearth fl simulate``: rounds with simulated clients through a real local aggregation tree
(optionally over a real shared-memory slot pool), each round checked against exact FedAvg
computed in float64. Stragglers close the round at its deadline; bad clients first send an
update holding a NaN (rejected), then a good one; with stragglers, a late update is refused."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
from hearth.cli_errors import fail
from hearth.functions.fedavg.aggregation import Aggregation
from hearth.functions.fedavg.cli import LEVEL_ORDER, _plan, _print_plan
from hearth.functions.fedavg.fold import UpdateRejected
from hearth.functions.fedavg.rounds import RoundError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


@dataclass
class SimOptions:
    clients: int
    params: int
    layers: int
    nodes: int
    fan_in: int
    levels: int | None
    rounds: int
    dtype: str
    stragglers: int
    bad: int
    min_fraction: float
    threads: int
    shm: bool
    seed: int

    @property
    def tolerance(self) -> float:
        """The largest relative error from exact FedAvg that still passes."""
        return 1e-5 if self.dtype == "float32" else 2e-3


def layer_shapes(rng: np.random.Generator, params: int, layers: int) -> list[tuple[int, ...]]:
    """``params`` parameters cut at random into ``layers`` layers, alternately 2-D and 1-D."""
    cuts = (
        np.sort(rng.choice(np.arange(1, params), size=layers - 1, replace=False))
        if layers > 1
        else np.array([], int)
    )
    sizes = np.diff(np.concatenate([[0], cuts, [params]])).astype(int)
    return [(int(s),) if i % 2 else (int(s), 1) for i, s in enumerate(sizes)]


def _slot_pool(shapes: list[tuple[int, ...]], clients: int, roles: int):
    """A real /dev/shm slot pool with a slot per client update and per partial aggregate."""
    from hearth.dataplane.shm import SlotPool
    from hearth.functions.fedavg.pack import Header, LayerSpec, Layout, packed_size

    lay = Layout(
        tuple(LayerSpec(f"layer{i}", np.dtype(np.float32), s) for i, s in enumerate(shapes))
    )
    size = packed_size(Header("partial", 2**40, lay, 2**40, "c" * 64, np.dtype(np.float32))) + 8192
    nslots = clients + 2 * roles + 8
    try:
        return SlotPool.create(
            f"hearth-fl-sim-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            [(1 << 16, 64), (size, nslots)],
        )
    except OSError as e:
        fail(f"cannot create a shared-memory pool in /dev/shm ({e}); use --no-shm")


def run(o: SimOptions) -> float:
    """Run ``o.rounds`` rounds, printing each; the worst relative error from exact FedAvg."""
    con = Console()
    rng = np.random.default_rng(o.seed)
    per_node = [
        o.clients // o.nodes + (1 if i < o.clients % o.nodes else 0) for i in range(o.nodes)
    ]
    updates = {f"node-{i}": c for i, c in enumerate(per_node) if c}
    plan = _plan(updates, o.fan_in, o.levels, "fedavg")
    shapes = layer_shapes(rng, o.params, o.layers)
    _print_plan(plan)
    pool = _slot_pool(shapes, o.clients, len(plan.roles)) if o.shm else None
    agg = Aggregation(plan, pool=pool, threads=o.threads)
    sim = _Rounds(o, agg, rng, con, shapes, [n for n, c in updates.items() for _ in range(c)])
    worst = 0.0
    try:
        after_first = 0
        for rid in range(1, o.rounds + 1):
            if rid == 2:
                after_first = sum(a.accumulators_created for a in agg.aggs.values())
            worst = max(worst, sim.round(rid))
        new = sum(a.accumulators_created for a in agg.aggs.values())
        first = after_first if o.rounds > 1 else new
        con.print(
            f"accumulators allocated: {first} in round 1, {new - first} in rounds 2-{o.rounds} (warm reuse)"
            if o.rounds > 1
            else f"accumulators allocated: {new}"
        )
    finally:
        agg.close()
        if pool is not None:
            pool.destroy()
    return worst


class _Rounds:
    """One simulation's rounds: the clients' updates, folded and checked."""

    def __init__(
        self,
        o: SimOptions,
        agg: Aggregation,
        rng: np.random.Generator,
        con: Console,
        shapes: list[tuple[int, ...]],
        node_of: list[str],
    ) -> None:
        self.o, self.agg, self.rng, self.con, self.shapes, self.node_of = (
            o,
            agg,
            rng,
            con,
            shapes,
            node_of,
        )

    def round(self, rid: int) -> float:
        """Round ``rid``: every submitting client's update folded, the result checked against
        exact FedAvg; its relative error."""
        o, agg = self.o, self.agg
        now = time.time()
        agg.start_round(
            rid,
            deadline=now + 3600,
            min_fraction=o.min_fraction,
            clients=[f"c{i}" for i in range(o.clients)],
        )
        order = self.rng.permutation(o.clients)
        submitting = [int(i) for i in order[: o.clients - o.stragglers]]
        t0 = time.perf_counter()
        exact, total_n, rejected = self._submit_all(rid, submitting, set(submitting[: o.bad]))
        dt = time.perf_counter() - t0
        rnd = agg.round
        if rnd.state != "closed":
            fail(f"round {rid} {rnd.state}: {rnd.reason}")
        model = agg.model(rid)
        err = max(
            float(np.max(np.abs(got.astype(np.float64) - e / total_n) / np.abs(e / total_n)))
            for (_, got), e in zip(model.layers, exact, strict=True)
        )
        tol = o.tolerance
        verdict = "[green]OK[/]" if err <= tol else "[red]MISMATCH[/]"
        self.con.print(
            f"round {rid}: {rnd.state} ({rnd.reason}); {len(rnd.received)} updates folded, {rejected} rejected, "
            f"stragglers {rnd.stragglers if o.stragglers else 'none'}; Σn={model.n}; "
            f"{len(agg.promotions)} promotions; {dt:.2f}s incl. client generation"
        )
        self.con.print(
            f"  check vs exact FedAvg (float64): max rel err {err:.2e} (tol {tol:.0e}) {verdict}; "
            f"layers {[nm for nm, _ in model.layers][:4]}{'...' if o.layers > 4 else ''} dtype {model.layers[0][1].dtype}"
        )
        if o.stragglers and rid == o.rounds:
            self._late_update(int(order[-1]))
        return err

    def _submit_all(
        self, rid: int, submitting: list[int], poisoned: set[int]
    ) -> tuple[list[np.ndarray], int, int]:
        """Each submitting client's update (a poisoned one's NaN update first), with a
        progress bar per level; the exact weighted sums, the total weight, the rejections."""
        o, agg, rng, shapes = self.o, self.agg, self.rng, self.shapes
        exact = [np.zeros(s, np.float64) for s in shapes]
        total_n = 0
        rejected = 0
        with Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
            console=self.con,
            transient=False,
        ) as prog:
            tasks = {
                lv: prog.add_task(
                    f"round {rid} {lv}",
                    total=agg.progress().get(lv, {}).get("expected", 0),
                    extra="",
                )
                for lv in LEVEL_ORDER
                if lv in agg.progress()
            }

            def refresh(tasks: dict = tasks) -> None:
                for lv, p in agg.progress().items():
                    prog.update(
                        tasks[lv],
                        completed=p["folded"],
                        extra=f"received {p['received']} rejected {p['rejected']}",
                    )

            for i in submitting:
                n = int(rng.integers(10, 1000))
                model = [
                    (f"layer{j}", (rng.random(s, dtype=np.float32) + 0.5).astype(o.dtype))
                    for j, s in enumerate(shapes)
                ]
                if i in poisoned:
                    broken = [(nm, a.copy()) for nm, a in model]
                    broken[-1][1].flat[-1] = np.nan
                    try:
                        agg.submit(agg.ingest(broken, n, client=f"c{i}", node=self.node_of[i]))
                    except UpdateRejected:
                        rejected += 1
                    refresh()
                agg.submit(agg.ingest(model, n, client=f"c{i}", node=self.node_of[i]))
                for e, (_, a) in zip(exact, model, strict=True):
                    e += a.astype(np.float64) * n
                total_n += n
                refresh()
            if o.stragglers:
                agg.expire(now=agg.round.deadline + 1)
                refresh()
        return exact, total_n, rejected

    def _late_update(self, late: int) -> None:
        """A straggler's update after the round closed: refused."""
        try:
            self.agg.submit(
                self.agg.ingest(
                    [(f"layer{j}", np.ones(s, self.o.dtype)) for j, s in enumerate(self.shapes)],
                    1,
                    client=f"c{late}",
                    node=self.node_of[late],
                )
            )
        except RoundError as e:
            self.con.print(f"  late update refused: {e}")
