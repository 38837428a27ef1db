"""`hearth coldstarts simulate`: a trace's arrivals -> the controller's keep-alive simulator ->
table, JSON and the Pareto plot (cold-start % vs idle memory-time), overall and per function
class. The simulation itself is ``hearth.controller.simulate.simulate`` (the only simulator)."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import json
from pathlib import Path

import numpy as np
import polars as pl

from . import readers as R
from .schedule import ScheduleParams, build_from_paths

DEFAULT_POLICIES = ["fixed:60", "fixed:600", "histogram", "greedy-dual", "coldstart-aware"]
CLASSES = ("rare", "medium", "frequent")


def classify_functions(arrivals: dict[str, np.ndarray]) -> dict[str, str]:
    """Function class by invocation count terciles (rare / medium / frequent)."""
    names = sorted(arrivals)
    n = np.array([arrivals[f].size for f in names], dtype=float)
    if n.size == 0:
        return {}
    q1, q2 = np.quantile(n, [1 / 3, 2 / 3])
    return {
        f: ("rare" if c <= q1 else "medium" if c <= q2 else "frequent")
        for f, c in zip(names, n, strict=True)
    }


def per_class(result, classes: dict[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for c in CLASSES:
        fs = [f for f, k in classes.items() if k == c]
        inv = sum(result.per_function.get(f, {}).get("invocations", 0) for f in fs)
        cold = sum(result.per_function.get(f, {}).get("cold_starts", 0) for f in fs)
        idle = sum(result.per_function.get(f, {}).get("idle_memory_gb_s", 0.0) for f in fs)
        out[c] = {
            "functions": len(fs),
            "invocations": int(inv),
            "cold_starts": int(cold),
            "cold_start_pct": 100.0 * cold / inv if inv else 0.0,
            "idle_memory_gb_s": float(idle),
        }
    return out


def mean_coldstart_per_function(paths) -> dict[str, float] | None:
    kinds = R.classify(paths, skipped=[])
    if "huawei-coldstart" not in kinds:
        return None
    cold = R.read_coldstarts(kinds["huawei-coldstart"])
    g = cold.group_by("funcID").agg(pl.col("totalCost_cold_start").mean())
    return dict(zip(g["funcID"].to_list(), g["totalCost_cold_start"].to_list(), strict=True))


def run(
    paths,
    out,
    policies: list[str] | None = None,
    memory_mb: float = 256.0,
    cold_start_s: float | None = None,
    exec_s: float = 0.1,
    window_s: float | None = None,
    max_functions: int | None = None,
    seed: int = 0,
) -> dict:
    from hearth.controller.simulate import simulate

    policies = policies or DEFAULT_POLICIES
    sched = build_from_paths(list(paths), ScheduleParams(seed=seed, duration_s=window_s))
    arrivals = sched.arrivals()
    if max_functions is not None and len(arrivals) > max_functions:
        rng = np.random.default_rng(seed)
        keep = rng.choice(sorted(arrivals), max_functions, replace=False)
        arrivals = {f: arrivals[f] for f in sorted(keep)}
    if not arrivals:
        raise ValueError("the trace window holds no arrivals")
    cs: float | dict[str, float]
    if cold_start_s is not None:
        cs = cold_start_s
    else:
        per_f = mean_coldstart_per_function(paths)
        if per_f:
            overall = float(np.mean(list(per_f.values())))
            cs = {f: float(per_f.get(f, overall)) for f in arrivals}
        else:
            cs = 1.0
    durs = (
        sched.df.filter(pl.col("phase") == "main")
        .group_by("function")
        .agg(pl.col("duration_ms").mean())
    )
    dmap = dict(zip(durs["function"].to_list(), durs["duration_ms"].to_list(), strict=True))
    ex = {f: max(float(dmap.get(f, exec_s * 1000)) / 1000.0, 1e-6) for f in arrivals}
    results = simulate(arrivals, policies, memory_mb=memory_mb, cold_start_s=cs, exec_s=ex)
    classes = classify_functions(arrivals)
    doc = {
        "trace": [str(p) for p in paths],
        "functions": len(arrivals),
        "invocations": int(sum(a.size for a in arrivals.values())),
        "memory_mb": memory_mb,
        "cold_start_s": cs
        if isinstance(cs, float)
        else "per-function mean from the cold-start table",
        "results": [
            {
                "policy": r.policy,
                "invocations": r.invocations,
                "cold_starts": r.cold_starts,
                "cold_start_pct": r.cold_start_pct,
                "idle_memory_gb_s": r.idle_memory_gb_s,
                "per_class": per_class(r, classes),
            }
            for r in results
        ],
    }
    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    (outd / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    pareto_plot(doc, outd / "pareto.png")
    return doc


def pareto_plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all functions", None), *[(c, c) for c in CLASSES]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.4), squeeze=False)
    markers = "os^Dv<>P*X"
    for ax, (title, cls) in zip(axes.ravel(), panels, strict=True):
        for i, r in enumerate(doc["results"]):
            d = r if cls is None else r["per_class"][cls]
            ax.scatter(
                d["idle_memory_gb_s"],
                d["cold_start_pct"],
                marker=markers[i % len(markers)],
                s=55,
                label=r["policy"],
            )
        ax.set_xlabel("idle memory-time (GB·s)")
        ax.set_title(title if cls is None else f"{title} functions")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("cold starts (% of invocations)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Keep-alive policies: cold-start % vs idle memory (lower-left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
