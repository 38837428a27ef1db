"""``hearth fl``: simulate a federated round locally, plan trees, drive rounds on a gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from hearth.cli_errors import fail

app = typer.Typer(
    name="fl",
    help="Federated aggregation (fedavg): simulate rounds, plan aggregation trees, drive rounds on a gateway.",
    no_args_is_help=True,
)
round_app = typer.Typer(
    help="Drive a round on a running gateway (deployed aggregator functions).", no_args_is_help=True
)
app.add_typer(round_app, name="round")

DEFAULT_PLAN = ".hearth-fl-plan.json"
LEVEL_ORDER = ("leaf", "middle", "top")


def parse_nodes(nodes: str | None, clients: int | None) -> dict[str, int]:
    """``a=12,b=8`` (updates per node) or a plain client count on one node."""
    if nodes:
        out: dict[str, int] = {}
        for part in nodes.split(","):
            name, sep, count = part.partition("=")
            if not sep or not name.strip():
                fail(f"--nodes: expected name=count[,name=count...], got {part!r}")
            try:
                out[name.strip()] = int(count)
            except ValueError:
                fail(f"--nodes: count for {name.strip()!r} is not an integer: {count!r}")
        return out
    if clients is None or clients < 1:
        fail("give --clients N (>= 1) or --nodes name=count,...")
    return {"node-0": int(clients)}  # type: ignore[arg-type]


def _plan(updates: dict[str, int], fan_in: int, levels: int | None, prefix: str):
    from hearth.functions.fedavg.tree import PlanError, plan_tree

    try:
        return plan_tree(updates, fan_in=fan_in, levels=levels, prefix=prefix)
    except PlanError as e:
        fail(str(e))


def _load_plan(path: Path):
    from hearth.functions.fedavg.tree import PlanError, TreePlan

    try:
        return TreePlan.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        fail(f"{path}: no plan file (run `hearth fl round start` first or pass --plan-file)")
    except (json.JSONDecodeError, PlanError) as e:
        fail(f"{path}: not a plan file ({e})")


def _print_plan(plan) -> None:
    from rich.console import Console
    from rich.tree import Tree

    con = Console()
    t = Tree(
        f"[bold]{plan.top.name}[/] (top, {plan.top.inputs} inputs, node {plan.top.node}, group {plan.top.group})"
    )

    def add(node, name):
        for c in plan.children(name):
            carried = f", carried by {c.instance}" if c.instance != c.name else ""
            sub = node.add(
                f"{c.name} ({c.level}, {c.inputs} inputs, node {c.node}, group {c.group}{carried})"
            )
            add(sub, c.name)

    add(t, plan.top.name)
    con.print(t)
    con.print(
        f"levels {plan.levels}, fan-in {plan.fan_in}, {len(plan.roles)} roles, {len(plan.instances)} instances; "
        f"cross-node edges: {len(plan.cross_node_edges())} (middle -> top only)"
    )


@app.command("plan")
def plan_cmd(
    nodes: str = typer.Option(None, help="Expected updates per node: a=12,b=8."),
    clients: int = typer.Option(None, help="Expected updates on a single node."),
    fan_in: int = typer.Option(4, help="Inputs per leaf/middle aggregator."),
    levels: int = typer.Option(None, help="Force 1, 2 or 3 levels (default: smallest that fits)."),
    prefix: str = typer.Option("fedavg", help="Function name prefix."),
    model_mb: float = typer.Option(
        44.84, help="Model size (MB) for the memory requests in the specs."
    ),
    specs_dir: Path = typer.Option(None, help="Write one FunctionSpec YAML per aggregator here."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan an aggregation tree and (optionally) write deployable specs with affinity groups."""
    plan = _plan(parse_nodes(nodes, clients), fan_in, levels, prefix)
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        _print_plan(plan)
    if specs_dir:
        import yaml

        specs_dir.mkdir(parents=True, exist_ok=True)
        for s in plan.function_specs(model_bytes=int(model_mb * 1e6)):
            d = s.model_dump(mode="json", exclude_defaults=True)
            (specs_dir / f"{s.name}.yaml").write_text(
                yaml.safe_dump({"name": d.pop("name"), **d}, sort_keys=False)
            )
        typer.echo(f"wrote {len(plan.instances)} specs to {specs_dir}")


@app.command()
def simulate(
    clients: int = typer.Option(16, min=1, help="Simulated clients (trainers)."),
    params: int = typer.Option(1_000_000, min=1, help="Model parameters."),
    layers: int = typer.Option(8, min=1, help="Named layers the parameters are split into."),
    nodes: int = typer.Option(2, min=1, help="Nodes the clients' updates arrive at."),
    fan_in: int = typer.Option(4, min=2, help="Inputs per leaf/middle aggregator."),
    levels: int = typer.Option(None, help="Force 1, 2 or 3 levels."),
    rounds: int = typer.Option(2, min=1, help="Rounds (aggregators stay warm across rounds)."),
    dtype: str = typer.Option("float32", help="Update dtype: float32 or float16."),
    stragglers: int = typer.Option(
        0, min=0, help="Clients that never submit (the round closes at its deadline)."
    ),
    bad: int = typer.Option(
        0, min=0, help="Clients whose first update holds a NaN (rejected, then resubmitted)."
    ),
    min_fraction: float = typer.Option(0.5, help="Quorum to close at the deadline."),
    threads: int = typer.Option(1, min=1, help="Threads per aggregator fold."),
    shm: bool = typer.Option(
        True, help="Put updates in a real shared-memory slot pool (/dev/shm)."
    ),
    seed: int = typer.Option(0),
) -> None:
    """Run rounds with simulated clients; show updates received/folded per level; check the
    result against exact FedAvg computed in float64."""
    from hearth.functions.fedavg import simulation

    if dtype not in ("float32", "float16"):
        fail(f"--dtype: expected float32 or float16, got {dtype!r}")
    if stragglers >= clients:
        fail(f"--stragglers ({stragglers}) must be fewer than --clients ({clients})")
    if bad > clients - stragglers:
        fail(f"--bad ({bad}) exceeds the clients that submit ({clients - stragglers})")
    if layers > params:
        fail(f"--layers ({layers}) exceeds --params ({params})")
    o = simulation.SimOptions(
        clients=clients,
        params=params,
        layers=layers,
        nodes=nodes,
        fan_in=fan_in,
        levels=levels,
        rounds=rounds,
        dtype=dtype,
        stragglers=stragglers,
        bad=bad,
        min_fraction=min_fraction,
        threads=threads,
        shm=shm,
        seed=seed,
    )
    if simulation.run(o) > o.tolerance:
        raise typer.Exit(1)


# -- rounds on a gateway -------------------------------------------------------------------------
GatewayOpt = typer.Option("http://127.0.0.1:8080", "--gateway", help="Gateway base URL.")
PlanOpt = typer.Option(Path(DEFAULT_PLAN), "--plan-file", help="Plan written by `round start`.")


def _gw(fn, *a: Any, **kw: Any) -> Any:
    from hearth.functions.fedavg.client import GatewayError

    try:
        return fn(*a, **kw)
    except GatewayError as e:
        fail(str(e))


@round_app.command("start")
def round_start(
    round_id: int = typer.Argument(..., help="Round id (increasing)."),
    nodes: str = typer.Option(None, help="Expected updates per node: a=12,b=8."),
    clients: int = typer.Option(None, help="Expected updates on one node."),
    fan_in: int = typer.Option(4),
    levels: int = typer.Option(None),
    prefix: str = typer.Option("fedavg"),
    gateway: str = GatewayOpt,
    plan_file: Path = PlanOpt,
) -> None:
    """Plan the tree, save it, and open the round on every deployed aggregator."""
    from hearth.functions.fedavg import client

    if plan_file.exists() and not nodes and not clients:
        plan = _load_plan(plan_file)
    else:
        plan = _plan(parse_nodes(nodes, clients), fan_in, levels, prefix)
    _gw(client.open_round, gateway, plan, round_id)
    plan_file.write_text(json.dumps({**plan.to_dict(), "round": round_id}))
    typer.echo(
        f"round {round_id} open on {len(plan.instances)} aggregators ({plan.expected} updates expected); plan saved to {plan_file}"
    )
    for lf in plan.entry_roles():
        typer.echo(
            f"  clients at {lf.node}: POST {gateway}/v1/functions/{lf.instance}:invoke  ({lf.inputs} updates)"
        )


@round_app.command("submit")
def round_submit(
    round_id: int = typer.Argument(...),
    model: Path = typer.Option(
        ..., "--model", help=".npz of named layers (np.savez) or .npy (one flat array)."
    ),
    samples: int = typer.Option(
        ..., "--samples", min=1, help="Training samples behind this update (n)."
    ),
    client: str = typer.Option(
        ..., "--client", help="Client id (a resubmission with the same id is not folded twice)."
    ),
    node: str = typer.Option(
        None, "--node", help="Node the client is attached to (default: the plan's first)."
    ),
    index: int = typer.Option(
        0,
        "--index",
        min=0,
        help="This client's position among the node's updates (picks the leaf).",
    ),
    gateway: str = GatewayOpt,
    plan_file: Path = PlanOpt,
) -> None:
    """Pack a client update and POST it to its leaf (what a trainer does)."""
    from hearth.functions.fedavg import client as fl_client
    from hearth.functions.fedavg.tree import PlanError

    plan = _load_plan(plan_file)
    try:
        if model.suffix == ".npz":
            with np.load(model, allow_pickle=False) as z:
                layers = [(k, z[k]) for k in z.files]
        else:
            layers = [("w", np.load(model, allow_pickle=False))]
    except (OSError, ValueError) as e:
        fail(f"--model: cannot read {model}: {e}")
    try:
        leaf = plan.leaf_for(node or plan.nodes[0][0], index)
    except PlanError as e:
        fail(str(e))
    reply = _gw(fl_client.submit, gateway, leaf.instance, layers, samples, round_id, client)
    body = reply.json() or {}
    typer.echo(
        f"{client} -> {leaf.instance}: folded {body.get('folded')}/{body.get('expected')}"
        + (" (duplicate, not folded again)" if body.get("duplicate") else "")
    )


@round_app.command("status")
def round_status(gateway: str = GatewayOpt, plan_file: Path = PlanOpt) -> None:
    """Updates received/folded per level (progress bars) and each aggregator's state."""
    from hearth.functions.fedavg import client
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    plan = _load_plan(plan_file)
    st = _gw(client.status, gateway, plan)
    con = Console()
    per: dict[str, dict[str, int]] = {}
    for r in plan.roles:
        s = st.get(r.name, {})
        d = per.setdefault(r.level, {"expected": 0, "received": 0, "folded": 0, "rejected": 0})
        d["expected"] += int(s.get("expected", r.inputs) or r.inputs)
        for k in ("received", "folded", "rejected"):
            d[k] += int(s.get(k, 0))
    with Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        console=con,
        auto_refresh=False,
    ) as prog:
        for lv in LEVEL_ORDER:
            if lv in per:
                p = per[lv]
                prog.add_task(
                    lv,
                    total=p["expected"],
                    completed=p["folded"],
                    extra=f"received {p['received']} rejected {p['rejected']}",
                )
        prog.refresh()
    top = st.get(plan.top.name, {})
    con.print(
        f"round {top.get('round')}: top done={top.get('done')} models kept {top.get('models')}"
    )


@round_app.command("close")
def round_close(
    round_id: int = typer.Argument(...), gateway: str = GatewayOpt, plan_file: Path = PlanOpt
) -> None:
    """Deadline: every aggregator forwards what it folded (bottom-up); the top publishes."""
    from hearth.functions.fedavg import client

    plan = _load_plan(plan_file)
    _gw(client.flush, gateway, plan, round_id)
    typer.echo(f"round {round_id} flushed on {len(plan.instances)} aggregators")


@round_app.command("fetch")
def round_fetch(
    round_id: int = typer.Argument(None, help="Round (default: the latest published)."),
    out: Path = typer.Option(
        Path("global-model.npz"),
        "--out",
        "-o",
        help=".npz (named layers) or .hfl (packed payload).",
    ),
    gateway: str = GatewayOpt,
    plan_file: Path = PlanOpt,
) -> None:
    """Download the global model of a round from the top aggregator."""
    from hearth.functions.fedavg import client
    from hearth.functions.fedavg.aggregation import parse_model

    plan = _load_plan(plan_file)
    reply = _gw(client.fetch, gateway, plan, round_id)
    if out.suffix == ".hfl":
        out.write_bytes(reply.body)
        model = parse_model(reply.body)
    else:
        model = parse_model(reply.body)
        with out.open("wb") as f:
            np.savez(f, **{nm: a for nm, a in model.layers})
    typer.echo(
        f"round {model.round_id}: {len(model.layers)} layers, Σn={model.n}, {len(reply.body)} bytes -> {out}"
    )


def _register_rounds() -> None:
    from hearth.functions.fedavg import cli_rounds

    cli_rounds.register(app)


_register_rounds()
