"""Locality-aware placement: pure scoring over numpy arrays of node capacity.

Why numpy: the controller re-plans thousands of instances over up to ~1,000 nodes; one
vectorised pass per decision keeps a placement in tens of microseconds.

Scoring (higher is better, infeasible nodes are -inf):
  fit       tightest leftover after placing (Best-Fit) -- or loosest when `spread`
  affinity  node already hosts members of the request's affinity group (edges stay in a node,
            so the shared-memory data plane can carry them)
  warm      node already hosts an instance of the same function (code/page cache warm)
  pool      node has an idle generic pool instance of the runtime (cold start skips phases)
  spread    penalty per replica of the same function already on the node (when asked)
Groups are packed with Best-Fit-Decreasing that first tries to put a whole group on one node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from hearth.controller.model import Instance, Node
from hearth.spec import FunctionSpec


@dataclass(frozen=True)
class Request:
    """One instance to place."""

    function: str
    cpu_millicores: int
    memory_mb: int
    runtime: str = "python3.11"
    group: str | None = None
    spread: bool = False

    @classmethod
    def for_spec(cls, spec: FunctionSpec) -> Request:
        return cls(
            function=spec.name,
            cpu_millicores=spec.resources.cpu_millicores,
            memory_mb=spec.resources.memory_mb,
            runtime=spec.runtime,
            group=spec.affinity_group,
            spread=spec.spread,
        )


@dataclass(frozen=True)
class Weights:
    fit: float = 1.0
    affinity: float = 4.0
    warm: float = 0.3
    pool: float = 0.5
    spread: float = 2.0


def fits_alone(node: Node, used_cpu: float, used_mem: float, req: Request) -> bool:
    """`Cluster.best` of a cluster of `node` alone, given what its live instances use: with
    one node, whether it fits is the whole choice. No numpy and no observation objects: the
    agent of a single node asks this on every cold start."""
    return (
        node.cpu_millicores - used_cpu >= req.cpu_millicores
        and node.memory_mb - used_mem >= req.memory_mb
    )


class Cluster:
    """Free capacity and per-node counts, updated as placements are committed."""

    def __init__(self, nodes: Sequence[Node], weights: Weights | None = None) -> None:
        self.names = [n.name for n in nodes]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.cap_cpu = np.array([n.cpu_millicores for n in nodes], dtype=np.float64)
        self.cap_mem = np.array([n.memory_mb for n in nodes], dtype=np.float64)
        self.free_cpu = self.cap_cpu.copy()
        self.free_mem = self.cap_mem.copy()
        self._inv_cpu = 0.5 / np.maximum(self.cap_cpu, 1.0)
        self._inv_mem = 0.5 / np.maximum(self.cap_mem, 1.0)
        self.w = weights or Weights()
        self.by_function: dict[str, np.ndarray] = {}
        self.by_group: dict[str, np.ndarray] = {}
        self.pool: dict[str, np.ndarray] = {}  # runtime -> idle pool instances per node
        self._n = len(nodes)

    # --- bookkeeping ---------------------------------------------------------------------------
    def _counts(self, table: dict[str, np.ndarray], key: str) -> np.ndarray:
        arr = table.get(key)
        if arr is None:
            arr = table[key] = np.zeros(self._n, dtype=np.int32)
        return arr

    @classmethod
    def from_observation(
        cls,
        nodes: Sequence[Node],
        instances: Iterable[Instance],
        specs: dict[str, FunctionSpec] | None = None,
        weights: Weights | None = None,
    ) -> Cluster:
        c = cls(nodes, weights)
        specs = specs or {}
        for inst in instances:
            i = c.index.get(inst.node)
            if i is None or inst.state == "stopping":
                continue
            c.free_cpu[i] -= inst.cpu_millicores
            c.free_mem[i] -= inst.memory_mb
            if inst.function is None:
                c._counts(c.pool, inst.runtime)[i] += 1
                continue
            c._counts(c.by_function, inst.function)[i] += 1
            spec = specs.get(inst.function)
            if spec is not None and spec.affinity_group:
                c._counts(c.by_group, spec.affinity_group)[i] += 1
        return c

    def commit(self, i: int, req: Request, from_pool: bool = False) -> None:
        """Record a placement (a pool instance being specialised frees its own slot first)."""
        if from_pool:
            pool = self._counts(self.pool, req.runtime)
            if pool[i] > 0:
                pool[i] -= 1
        self.free_cpu[i] -= req.cpu_millicores
        self.free_mem[i] -= req.memory_mb
        self._counts(self.by_function, req.function)[i] += 1
        if req.group:
            self._counts(self.by_group, req.group)[i] += 1

    def release(self, i: int, req: Request) -> None:
        self.free_cpu[i] += req.cpu_millicores
        self.free_mem[i] += req.memory_mb
        self._counts(self.by_function, req.function)[i] -= 1
        if req.group:
            self._counts(self.by_group, req.group)[i] -= 1

    # --- scoring -------------------------------------------------------------------------------
    def feasible(self, cpu: float, mem: float) -> np.ndarray:
        return (self.free_cpu >= cpu) & (self.free_mem >= mem)

    def residual(self, cpu: float, mem: float) -> np.ndarray:
        """Normalised leftover in [0, 1] after placing (mean of the two dimensions)."""
        return (self.free_cpu - cpu) * self._inv_cpu + (self.free_mem - mem) * self._inv_mem

    def scores(self, req: Request) -> np.ndarray:
        w = self.w
        res = self.residual(req.cpu_millicores, req.memory_mb)
        s = w.fit * res if req.spread else w.fit * (1.0 - res)
        f = self.by_function.get(req.function)
        if f is not None:
            if req.spread:
                s = s - w.spread * f
            else:
                s = s + w.warm * (f > 0)
        if req.group:
            g = self.by_group.get(req.group)
            if g is not None:
                s = s + w.affinity * (g > 0)
        p = self.pool.get(req.runtime)
        if p is not None:
            s = s + w.pool * (p > 0)
        return np.where(self.feasible(req.cpu_millicores, req.memory_mb), s, -np.inf)

    def best(self, req: Request) -> int | None:
        if self._n == 1:  # one node (every `hearth up`): whether it fits is the whole choice,
            # and the scoring's numpy passes cost ~0.1 ms of a warm-pool start's ~2 ms
            fits = self.free_cpu[0] >= req.cpu_millicores and self.free_mem[0] >= req.memory_mb
            return 0 if fits else None
        s = self.scores(req)
        i = int(np.argmax(s))
        return None if s[i] == -np.inf else i

    def place(self, req: Request) -> int | None:
        """Choose and commit a node for one instance; None when nothing fits."""
        i = self.best(req)
        if i is not None:
            p = self.pool.get(req.runtime)
            self.commit(i, req, from_pool=bool(p is not None and p[i] > 0))
        return i

    def place_group(self, reqs: Sequence[Request]) -> list[int | None]:
        """Best-Fit-Decreasing for one affinity group.

        1. If some node fits the whole group, use the tightest such node (prefer one that already
           hosts the group) -- every edge stays inside it.
        2. Otherwise take items largest first (stable, so a depth-first tree order keeps subtrees
           together); each goes to the tightest node already used by the group, else opens the
           tightest node that fits all remaining items, else the roomiest node.
        """
        out: list[int | None] = [None] * len(reqs)
        if not reqs:
            return out
        tot_cpu = float(sum(r.cpu_millicores for r in reqs))
        tot_mem = float(sum(r.memory_mb for r in reqs))
        group = reqs[0].group
        fits_all = self.feasible(tot_cpu, tot_mem)
        if fits_all.any():
            s = 1.0 - self.residual(tot_cpu, tot_mem)
            if group and group in self.by_group:
                s = s + self.w.affinity * (self.by_group[group] > 0)
            i = int(np.argmax(np.where(fits_all, s, -np.inf)))
            for k, r in enumerate(reqs):
                self.commit(i, r)
                out[k] = i
            return out
        order = sorted(
            range(len(reqs)),
            key=lambda k: (
                -(reqs[k].cpu_millicores * self._inv_cpu[0] + reqs[k].memory_mb * self._inv_mem[0])
            ),
        )
        used: list[int] = []
        if group and group in self.by_group:
            used = [int(i) for i in np.flatnonzero(self.by_group[group] > 0)]
        rem_cpu, rem_mem = tot_cpu, tot_mem
        for k in order:
            r = reqs[k]
            choice = None
            if used:
                u = np.array(used)
                ok = (self.free_cpu[u] >= r.cpu_millicores) & (self.free_mem[u] >= r.memory_mb)
                if ok.any():
                    res = self.residual(r.cpu_millicores, r.memory_mb)[u]
                    choice = int(u[np.argmax(np.where(ok, -res, -np.inf))])
            if choice is None:
                feas = self.feasible(r.cpu_millicores, r.memory_mb)
                if feas.any():
                    whole = self.feasible(rem_cpu, rem_mem)
                    if whole.any():
                        choice = int(
                            np.argmax(np.where(whole, -self.residual(rem_cpu, rem_mem), -np.inf))
                        )
                    else:
                        choice = int(
                            np.argmax(
                                np.where(
                                    feas, self.residual(r.cpu_millicores, r.memory_mb), -np.inf
                                )
                            )
                        )
                    used.append(choice)
            if choice is not None:
                self.commit(choice, r)
            out[k] = choice
            rem_cpu -= r.cpu_millicores
            rem_mem -= r.memory_mb
        return out

    def nodes_used(self) -> int:
        return int(
            np.count_nonzero((self.free_cpu < self.cap_cpu) | (self.free_mem < self.cap_mem))
        )


def lower_bound_nodes(reqs: Iterable[Request], node_cpu: float, node_mem: float) -> int:
    """⌈U/C⌉ per dimension (identical nodes): no packing can use fewer nodes."""
    cpu = mem = 0.0
    for r in reqs:
        cpu += r.cpu_millicores
        mem += r.memory_mb
    return int(max(np.ceil(cpu / node_cpu - 1e-9), np.ceil(mem / node_mem - 1e-9)))


#: a function's label naming the node it should run on (honoured while that node is live)
NODE_HINT = "hearth.io/node-hint"


def node_label(s: str) -> str:
    """A node name as a DNS label (how specs name nodes in ``hearth.io/node-hint``)."""
    import re

    s = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
    return (s or "node")[:40].strip("-") or "node"


def assign_hosts(
    nodes: Sequence[Node],
    specs: Sequence[FunctionSpec],
    previous: dict[str, Sequence[str]] | None = None,
    weights: Weights | None = None,
) -> dict[str, tuple[str, ...]]:
    """Which live nodes host each function (a pure decision; the agents forward the rest).

    - A function whose ``hearth.io/node-hint`` label names a live node (by name or by its DNS
      label) is hosted there.
    - An affinity group goes to one node, so its chained calls and aggregation edges stay in
      shared memory: the node of a pinned member, else where the group already was (its warm
      instances stay useful), else the tightest node that fits the whole group (Best-Fit; split
      Best-Fit-Decreasing only when no node fits it).
    - Every other function is hosted on every live node: an invocation runs where it arrives and
      nothing crosses the network.
    """
    previous = previous or {}
    names = sorted(n.name for n in nodes)
    if not names:
        return {}
    live = set(names)
    by_label = {node_label(n): n for n in names}
    cluster = Cluster(sorted(nodes, key=lambda n: n.name), weights)
    out: dict[str, tuple[str, ...]] = {}

    def pinned(spec: FunctionSpec) -> str | None:
        hint = spec.labels.get(NODE_HINT)
        if not hint:
            return None
        return hint if hint in live else by_label.get(node_label(hint))

    groups: dict[str, list[FunctionSpec]] = {}
    for spec in sorted(specs, key=lambda s: s.name):
        node = pinned(spec)
        if node is not None:
            out[spec.name] = (node,)
            cluster.commit(cluster.index[node], Request.for_spec(spec))
        elif spec.affinity_group and not spec.spread:
            groups.setdefault(spec.affinity_group, []).append(spec)
        else:
            out[spec.name] = tuple(names)
    for group in sorted(groups):
        members = groups[group]
        anchor = None
        for spec in sorted(specs, key=lambda s: s.name):  # a pinned member draws the group
            if spec.affinity_group == group and spec.name in out and len(out[spec.name]) == 1:
                anchor = out[spec.name][0]
                break
        if anchor is None:
            was = [
                n for m in members for n in previous.get(m.name, ()) if n in live
            ]  # stickiness: where the group's instances already run
            if was:
                anchor = max(sorted(set(was)), key=was.count)
        if anchor is not None:
            for m in members:
                out[m.name] = (anchor,)
                cluster.commit(cluster.index[anchor], Request.for_spec(m))
            continue
        placed = cluster.place_group([Request.for_spec(m) for m in members])
        for m, i in zip(members, placed, strict=True):
            # nothing fits: host it everywhere and let each node's admission say no
            out[m.name] = (cluster.names[i],) if i is not None else tuple(names)
    return out
