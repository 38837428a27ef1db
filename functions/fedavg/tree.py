"""Plan the aggregation tree (LIFL): leaves fold client updates, middles fold the leaves of one
node, the top folds the middles and divides.

Why per node: an edge inside a node is a shared-memory hand-off (a descriptor, no bytes move);
an edge between nodes copies a whole model over the network. So every leaf and the middle above
it share an affinity group (the controller's Best-Fit packs a group onto one node) and only
middle → top crosses nodes. A pure planner: counts in, roles out; nothing is started here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

Level = Literal["leaf", "middle", "top"]
LEVELS: tuple[Level, ...] = ("leaf", "middle", "top")
HANDLER = "hearth.functions.fedavg.handlers"


class PlanError(ValueError):
    """The tree cannot be planned from these inputs; the message names the argument."""


@dataclass(frozen=True)
class Role:
    """One aggregator role. ``instance`` is the aggregator that carries it (promotion lets a
    finished leaf carry its middle too); ``inputs`` is what it waits for each round."""

    name: str
    level: Level
    parent: str | None
    inputs: int
    node: str
    group: str
    instance: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "parent": self.parent,
            "inputs": self.inputs,
            "node": self.node,
            "affinity_group": self.group,
            "instance": self.instance,
        }


@dataclass(frozen=True)
class TreePlan:
    roles: tuple[Role, ...]
    fan_in: int
    levels: int
    nodes: tuple[tuple[str, int], ...]  # (node, expected updates) in input order
    prefix: str = "fedavg"

    # -- queries -----------------------------------------------------------------------------
    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"no role {name!r} in the plan")

    @property
    def top(self) -> Role:
        return next(r for r in self.roles if r.parent is None)

    def children(self, name: str) -> list[Role]:
        return [r for r in self.roles if r.parent == name]

    def by_level(self, level: Level) -> list[Role]:
        return [r for r in self.roles if r.level == level]

    def entry_roles(self) -> list[Role]:
        """Roles that take client updates: the leaves (or the top alone in a 1-level tree)."""
        return [r for r in self.roles if r.level == "leaf" or self.levels == 1]

    def leaves_on(self, node: str) -> list[Role]:
        return [r for r in self.entry_roles() if r.node == node and r.inputs > 0]

    @property
    def expected(self) -> int:
        return sum(c for _, c in self.nodes)

    @property
    def instances(self) -> list[str]:
        """Distinct aggregator instances (fewer than roles after promotions)."""
        return sorted({r.instance for r in self.roles})

    def cross_node_edges(self) -> list[tuple[str, str]]:
        """Edges whose ends sit on different nodes (only middle → top, by construction)."""
        out = []
        for r in self.roles:
            if r.parent is not None and self.role(r.parent).node != r.node:
                out.append((r.name, r.parent))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "fan_in": self.fan_in,
            "levels": self.levels,
            "nodes": [list(x) for x in self.nodes],
            "roles": [r.to_dict() for r in self.roles],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TreePlan:
        try:
            roles = tuple(
                Role(
                    r["name"],
                    r["level"],
                    r["parent"],
                    int(r["inputs"]),
                    r["node"],
                    r["affinity_group"],
                    r["instance"],
                )
                for r in d["roles"]
            )
            return cls(
                roles,
                int(d["fan_in"]),
                int(d["levels"]),
                tuple((str(n), int(c)) for n, c in d["nodes"]),
                d.get("prefix", "fedavg"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"plan: malformed plan document ({e})") from None

    # -- promotion ---------------------------------------------------------------------------
    def promote(self, leaf: str) -> TreePlan:
        """Let the finished leaf ``leaf`` carry its parent's role: its accumulator already holds
        one of the parent's inputs, so no partial moves and no new instance starts."""
        r = self.role(leaf)
        if r.level != "leaf" or r.parent is None:
            raise PlanError(f"promote: {leaf!r} is not a leaf with a parent")
        p = self.role(r.parent)
        if p.node != r.node:
            raise PlanError(
                f"promote: {leaf!r} (node {r.node}) and its parent {p.name!r} (node {p.node}) are on different nodes"
            )
        if p.instance != p.name:
            raise PlanError(f"promote: {p.name!r} is already carried by {p.instance!r}")
        roles = tuple(
            replace(x, instance=r.instance) if x.name == p.name else x for x in self.roles
        )
        return replace(self, roles=roles)

    # -- deployment --------------------------------------------------------------------------
    def function_specs(
        self,
        model_bytes: int = 0,
        *,
        keep_alive_s: float = 600.0,
        acc_dtype: str = "float32",
        pinned: bool = False,
        stream_prefix: str | None = None,
    ) -> list[Any]:
        """One FunctionSpec per aggregator instance, with its affinity group and role env.

        ``stream_prefix`` adds a Redis-stream trigger ``<prefix><leaf>`` to every entry role, so
        clients may also submit packed updates with ``hearth publish`` (events are limited to
        1 MiB by the queue: small models only; a redelivered update is not folded twice).
        Instances start on the first input and stay warm for ``keep_alive_s`` (rounds closer
        than that reuse them; idle trees scale in); ``pinned`` keeps one running always.
        Memory request: two accumulators + one in-flight input + slack, i.e. the bound the
        design promises ((fan-in + 2) models is the worst case when inputs queue)."""
        from hearth.controller.placement import NODE_HINT, node_label
        from hearth.spec import FunctionSpec

        acc_bytes = model_bytes if acc_dtype == "float32" else 2 * model_bytes
        mem = max(128, math.ceil((2 * acc_bytes + model_bytes) / 2**20) + 96)
        specs = []
        for r in self.roles:
            if r.instance != r.name:
                continue  # carried by another instance (promoted)
            specs.append(
                FunctionSpec(
                    name=r.name,
                    handler=f"{HANDLER}:{r.level}",
                    init=f"{HANDLER}:init",
                    env=self._role_env(r, acc_dtype),
                    resources={
                        # the top also keeps the last 3 global models
                        "memory_mb": mem
                        + (math.ceil(3 * model_bytes / 2**20) if r.level == "top" else 0),
                        "cpu_millicores": 1000 if r.level == "top" else 500,
                    },
                    concurrency=1,
                    min_instances=1 if pinned else 0,
                    max_instances=1,
                    keep_alive={"policy": "fixed", "ttl_s": keep_alive_s},
                    affinity_group=r.group,
                    triggers=[{"type": "http"}]
                    + (
                        [{"type": "redis-stream", "stream": f"{stream_prefix}{r.name}"}]
                        if stream_prefix and r in self.entry_roles()
                        else []
                    ),
                    labels={
                        "hearth.io/fedavg-tree": self.prefix,
                        "hearth.io/fedavg-level": r.level,
                        NODE_HINT: node_label(r.node),
                    },
                )
            )
        return specs

    def _role_env(self, r: Role, acc_dtype: str) -> dict[str, str]:
        """What an aggregator instance reads to know its role: level, parent, inputs, node, the
        accumulator's type, and the roles it carries for others (promoted), if any."""
        parent_fn = self.role(r.parent).instance if r.parent else ""
        env = {
            "FEDAVG_ROLE": r.level,
            "FEDAVG_PARENT": parent_fn,
            "FEDAVG_EXPECTED": str(r.inputs),
            "FEDAVG_NODE": r.node,
            "FEDAVG_ACC_DTYPE": acc_dtype,
        }
        hosted = [x for x in self.roles if x.instance == r.name and x.name != r.name]
        if hosted:
            env["FEDAVG_HOSTS"] = ";".join(
                f"{x.name}:{x.level}:{self.role(x.parent).instance if x.parent else ''}:{x.inputs}"
                for x in hosted
            )
        return env

    def leaf_for(self, node: str, index: int) -> Role:
        """The leaf that takes the ``index``-th update arriving at ``node`` (0-based)."""
        leaves = self.leaves_on(node)
        if not leaves:
            raise PlanError(
                f"node {node!r} has no leaf in this plan (nodes: {[n for n, _ in self.nodes]})"
            )
        for lf in leaves:
            if index < lf.inputs:
                return lf
            index -= lf.inputs
        raise PlanError(
            f"node {node!r} expected {sum(lf.inputs for lf in leaves)} updates; got more"
        )


def _split(total: int, parts: int) -> list[int]:
    """``total`` into ``parts`` near-equal positive shares (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_tree(
    updates: Mapping[str, int] | int,
    fan_in: int = 4,
    levels: int | None = None,
    prefix: str = "fedavg",
) -> TreePlan:
    """Plan the tree for ``updates`` (expected updates per node, or a count on one node).

    ``fan_in`` bounds the inputs of leaves and middles (the top takes what is left);
    ``levels`` forces 1 (one aggregator), 2 (leaves → top) or 3 (leaves → middle per node → top);
    by default the smallest depth that respects ``fan_in`` (at most 3)."""
    nodes = _checked(updates, fan_in, prefix)
    total = sum(c for _, c in nodes)
    if levels is None:
        levels = _depth(nodes, total, fan_in)
    if levels not in (1, 2, 3):
        raise PlanError(f"levels: must be 1, 2 or 3, got {levels!r}")

    top_i = max(range(len(nodes)), key=lambda i: (nodes[i][1], -i))
    top_node = nodes[top_i][0]
    top_name = f"{prefix}-top"
    top_group = f"{prefix}-g{top_i}"
    if levels == 1:
        return TreePlan(
            (Role(top_name, "top", None, total, top_node, top_group, top_name),),
            fan_in,
            levels,
            tuple(nodes),
            prefix,
        )
    mids, leaves = _below_top(nodes, fan_in, levels, prefix, top_name)
    top_inputs = len(mids) if levels == 3 else len(leaves)
    top = Role(top_name, "top", None, top_inputs, top_node, top_group, top_name)
    return TreePlan((top, *mids, *leaves), fan_in, levels, tuple(nodes), prefix)


def _checked(updates: Mapping[str, int] | int, fan_in: int, prefix: str) -> list[tuple[str, int]]:
    """The (node, expected updates) pairs, once the arguments are known to make a plan."""
    if isinstance(updates, int):
        updates = {"node-0": updates}
    if not updates:
        raise PlanError("updates: need at least one node")
    nodes: list[tuple[str, int]] = []
    for node, c in updates.items():
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise PlanError(f"updates[{node!r}]: expected a non-negative integer, got {c!r}")
        nodes.append((str(node), c))
    if sum(c for _, c in nodes) < 1:
        raise PlanError("updates: expect at least one update in total")
    if not isinstance(fan_in, int) or fan_in < 2:
        raise PlanError(f"fan_in: must be an integer >= 2, got {fan_in!r}")
    if not re.fullmatch(r"[a-z]([a-z0-9-]{0,30}[a-z0-9])?", prefix):
        raise PlanError(
            f"prefix: {prefix!r} must be a short DNS label (lowercase letters, digits, '-')"
        )
    return nodes


def _depth(nodes: list[tuple[str, int]], total: int, fan_in: int) -> int:
    """The smallest depth that respects ``fan_in``: one aggregator, leaves → top, or a middle
    per node between them."""
    busy = [(n, c) for n, c in nodes if c > 0]
    if total <= fan_in and len(busy) == 1:
        return 1
    if (
        all(math.ceil(c / fan_in) <= 1 for _, c in busy)
        or sum(math.ceil(c / fan_in) for _, c in busy) <= fan_in
    ):
        return 2
    return 3


def _below_top(
    nodes: list[tuple[str, int]], fan_in: int, levels: int, prefix: str, top_name: str
) -> tuple[list[Role], list[Role]]:
    """The middles (3 levels) and leaves of each node with updates, in node order."""
    mids: list[Role] = []
    leaves: list[Role] = []
    for i, (node, c) in enumerate(nodes):
        if c == 0:
            continue
        group = f"{prefix}-g{i}"
        nl = math.ceil(c / fan_in)
        shares = _split(c, nl)
        if levels == 2:
            for j, s in enumerate(shares):
                nm = f"{prefix}-leaf-{i}-{j}"
                leaves.append(Role(nm, "leaf", top_name, s, node, group, nm))
            continue
        j = 0
        for m, ms in enumerate(_split(nl, math.ceil(nl / fan_in))):
            mname = f"{prefix}-mid-{i}-{m}"
            mids.append(Role(mname, "middle", top_name, ms, node, group, mname))
            for _ in range(ms):
                nm = f"{prefix}-leaf-{i}-{j}"
                leaves.append(Role(nm, "leaf", mname, shares[j], node, group, nm))
                j += 1
    return mids, leaves
