"""The cold-start report's figures (matplotlib Agg, drawn from numpy arrays only): one function
per figure, one panel per trace, and :func:`figure_jobs`, the figures a set of analyses calls for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .coldstart_trace import Analysis
from .fits import lognormal_cdf, weibull_cdf
from .trace_columns import COMP


def _time_unit(bucket: float) -> tuple[float, str]:
    if bucket >= 86400:
        return 86400.0, "day"
    if bucket >= 3600:
        return 3600.0, "hour"
    if bucket >= 60:
        return 60.0, "minute"
    return 1.0, "second"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _grid(plt, n: int, w: float = 5.2, h: float = 3.8, sharey: bool = True):
    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False, sharey=sharey)
    return fig, list(axes[0])


def _plain(v: float, _pos=None) -> str:
    return f"{v:g}"


def _log_axis(ax, which: str = "x", lo: float | None = None, hi: float | None = None) -> None:
    """Log scale with plain tick labels (0.1, 1, 10; no mathtext) and no minor ticks, which
        are most of the drawing time; 1-2-5 ticks when the data span less than two decades, and
    1-1.5-2-3-5-7 when they span less than one."""
    from matplotlib import ticker

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    if lo is not None and hi is not None and lo > 0 and hi / lo < 10:  # (1-2-5: two labels)
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    elif lo is not None and hi is not None and lo > 0 and hi / lo < 100:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(_plain))
    axis.set_minor_locator(ticker.NullLocator())


def _title(ax, text: str) -> None:
    ax.set_title(text, fontsize=10, y=1.0)  # a fixed y skips matplotlib's title-overlap search


def _span(arrays) -> tuple[float | None, float | None]:
    xs = [a[a > 0] for a in arrays if a is not None and len(a)]
    xs = [a for a in xs if a.size]
    if not xs:
        return None, None
    return min(float(a.min()) for a in xs), max(float(a.max()) for a in xs)


class Saver:
    def __init__(self, plt, out: Path):
        self.plt, self.out, self.made = plt, out, []

    def __call__(
        self,
        fig,
        name: str,
        caption: str,
        bottom: float = 0.62,
        left: float = 0.75,
        wspace: float = 0.12,
    ):
        # fixed margins (inches) instead of tight_layout: same look, a fraction of the cost
        w, h = fig.get_size_inches()
        fig.subplots_adjust(
            left=left / w, right=1 - 0.25 / w, bottom=bottom / h, top=1 - 0.72 / h, wspace=wspace
        )
        fig.savefig(self.out / name, pil_kwargs={"compress_level": 1})
        self.plt.close(fig)
        self.made.append((name, caption))


CDF_TITLES = {
    "region": "region",
    "cluster": "cluster",
    "runtime": "runtime",
    "trigger": "trigger type",
    "pool": "pool size (CPU millicores-memory MB)",
    "origin": "origin (warm pool or new instance)",
}


def _fig_cdf(grp: str):
    title = CDF_TITLES[grp]

    def draw(plt, analyses: list[Analysis], save: Saver) -> None:
        fig, axes = _grid(plt, len(analyses))
        names = sorted({g for a in analyses for g in a.curves["cdf"].get(grp, {})})
        palette = plt.get_cmap("tab10")
        color = {g: palette(i % 10) for i, g in enumerate(names)}  # same group, same colour
        lo, hi = _span([v["x"] for a in analyses for v in a.curves["cdf"].get(grp, {}).values()])
        for ax, a in zip(axes, analyses, strict=True):
            cur = a.curves["cdf"].get(grp)
            if not cur:
                ax.text(0.5, 0.5, "no runtime table given", ha="center", transform=ax.transAxes)
            else:
                for g, v in cur.items():
                    label = g.split("-", 1)[-1] if grp == "pool" and g.startswith("pool") else g
                    ax.step(
                        v["x"],
                        v["y"],
                        where="post",
                        label=f"{label} (n={v['n']:,})",
                        color=color[g],
                    )
                ax.legend(fontsize=8, loc="lower right")
            _log_axis(ax, "x", lo, hi)
            ax.set_xlabel("cold-start time (s, log scale)")
            _title(ax, a.label)
        axes[0].set_ylabel("CDF")
        fig.suptitle(f"Cold-start time by {title}")
        save(fig, f"cdf_{grp}.png", f"CDF of cold-start time per {title} (log x).")

    return draw


def _fig_components_time(plt, analyses: list[Analysis], save: Saver) -> None:
    fig, axes = _grid(plt, len(analyses), sharey=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, a in zip(axes, analyses, strict=True):
        bucket, ct = a.curves["components_time"]
        unit, name = _time_unit(bucket)
        x = ct["bucket"] * bucket / unit
        ys = [ct[c] for c in COMP]
        ax.stackplot(
            x, *ys, labels=[c.replace("Cost", "") for c in COMP], colors=colors, alpha=0.85
        )
        top = float(np.nanmax(np.sum(ys, axis=0))) if len(x) else 1.0
        ax.set_ylim(0, top * 1.35)
        ax.set_xlabel(name)
        ax.set_ylabel("mean seconds per cold start")
        _title(ax, a.label)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle("Cold-start components over time (stacked means)")
    save(
        fig,
        "components_time.png",
        "Mean of each cold-start component per time bucket, stacked.",
        wspace=0.3,
    )


def _fig_component_shares(plt, analyses: list[Analysis], save: Saver) -> None:
    n = len(analyses)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / n
    xs = np.arange(len(COMP))
    for i, a in enumerate(analyses):
        sh = a.stats["components"]["share_of_total_time"]
        ax.bar(xs + i * width, [sh[c] or 0 for c in COMP], width, label=a.label)
    ax.set_xticks(xs + width * (n - 1) / 2, [c.replace("Cost", "") for c in COMP])
    ax.set_ylabel("share of total cold-start time")
    ax.legend(fontsize=8)
    _title(ax, "Component shares")
    save(fig, "component_shares.png", "Share of total cold-start time spent in each component.")


def _fig_fit(
    plt,
    analyses: list[Analysis],
    save: Saver,
    *,
    stat: str,
    curve: str,
    cdf,
    published: str,
    floor: float,
    xlabel: str,
    title: str,
    name: str,
    caption: str,
) -> None:
    """Empirical CDF (log x) with the fitted and the published distribution, per trace;
    `cdf(grid, params)` evaluates the distribution from its stats entry."""
    fig, axes = _grid(plt, len(analyses))
    for ax, a in zip(axes, analyses, strict=True):
        if curve not in a.curves:
            ax.text(
                0.5, 0.5, a.stats[stat]["error"], ha="center", transform=ax.transAxes, wrap=True
            )
            continue
        x, y = a.curves[curve]
        f = a.stats[stat]
        ax.step(x, y, where="post", label="empirical", color="k")
        grid = np.logspace(np.log10(max(x.min(), floor)), np.log10(x.max()), 300)
        ax.plot(
            grid,
            cdf(grid, f),
            "--",
            label=f"fit: mean {f['mean']:.2f}s sd {f['sd']:.2f}s (KS {f['ks_vs_fit']:.3f})",
        )
        ax.plot(
            grid,
            cdf(grid, f["published"]),
            ":",
            label=f"published: {published} (KS {f['ks_vs_published']:.3f})",
        )
        _log_axis(ax, "x", grid[0], grid[-1])
        ax.set_xlabel(xlabel)
        _title(ax, a.label)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("CDF")
    fig.suptitle(title)
    save(fig, name, caption)


def _fig_fit_coldstart(plt, analyses: list[Analysis], save: Saver) -> None:
    _fig_fit(
        plt,
        analyses,
        save,
        stat="fit_coldstart_lognormal",
        curve="total",
        cdf=lambda g, p: lognormal_cdf(g, p["mu"], p["sigma"]),
        published="mean 3.24s sd 7.10s",
        floor=1e-4,
        xlabel="cold-start time (s, log scale)",
        title="Cold-start time: LogNormal fit",
        name="fit_coldstart.png",
        caption="Empirical CDF of cold-start time with the fitted and the published LogNormal.",
    )


def _fig_fit_interarrival(plt, analyses: list[Analysis], save: Saver) -> None:
    _fig_fit(
        plt,
        analyses,
        save,
        stat="fit_interarrival_weibull",
        curve="gaps",
        cdf=lambda g, p: weibull_cdf(g, p["shape"], p["scale"]),
        published="mean 1.25s sd 3.66s",
        floor=1e-6,
        xlabel="time between cold starts (s, log scale)",
        title="Time between cold starts: Weibull fit",
        name="fit_interarrival.png",
        caption="Empirical CDF of inter-cold-start times with fitted and published Weibull.",
    )


def _fig_spearman(plt, analyses: list[Analysis], save: Saver) -> None:
    fig, axes = _grid(plt, len(analyses), w=5.0, h=4.4, sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        m = a.stats["spearman"]["per_function"]
        if not m:
            continue
        cols = list(m)
        mat = np.array([[m[r][c] if m[r][c] is not None else np.nan for c in cols] for r in cols])
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
        short = [c.replace("Cost", "").replace("_cold_start", "") for c in cols]
        ax.set_xticks(range(len(cols)), short, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(cols)), short, fontsize=8)
        for i in range(len(cols)):
            for j in range(len(cols)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.grid(False)
        _title(ax, a.label)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Spearman correlation across functions")
    save(
        fig,
        "spearman.png",
        "Spearman rank correlations across functions.",
        bottom=1.25,
        left=1.35,
        wspace=0.6,
    )


def _fig_per_hour(plt, analyses: list[Analysis], save: Saver) -> None:
    fig, axes = _grid(plt, len(analyses), w=6.0, sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        for region, (h, counts) in a.curves["hourly"].items():
            ax.plot(h / 24, counts, lw=0.8, label=region)
        ax.set_xlabel("day")
        ax.set_ylabel("cold starts per hour")
        _title(ax, a.label)
        ax.legend(fontsize=8)
    fig.suptitle("Cold starts per hour (peak-to-trough)")
    save(fig, "coldstarts_per_hour.png", "Cold starts per hour per region.", wspace=0.3)


def _fig_requests_vs_coldstarts(plt, analyses: list[Analysis], save: Saver) -> None:
    fig, axes = _grid(plt, len(analyses), sharey=False)
    for ax, a in zip(axes, analyses, strict=True):
        pf = a.curves.get("per_function")
        if pf is None:
            ax.text(0.5, 0.5, "no per-request rows given", ha="center", transform=ax.transAxes)
            continue
        ax.scatter(pf["requests"], pf["coldstarts"], s=6, alpha=0.5)
        top = float(pf["requests"].max()) if pf["requests"].size else 1.0
        lim = [1, max(top, 10)]
        ax.plot(lim, lim, "k:", lw=0.8, label="every request cold")
        _log_axis(ax, "x", *lim)
        _log_axis(ax, "y", *lim)
        ax.set_xlabel("requests per function")
        ax.set_ylabel("cold starts per function")
        _title(ax, a.label)
        ax.legend(fontsize=8)
    fig.suptitle("Requests vs cold starts per function")
    save(
        fig,
        "requests_vs_coldstarts.png",
        "Requests vs cold starts per function (log-log).",
        wspace=0.3,
    )


def _fig_pod_utility(plt, analyses: list[Analysis], save: Saver) -> None:
    fig, axes = _grid(plt, len(analyses))
    lo, hi = _span(
        [np.maximum(a.curves["utility"][0], 1e-3) for a in analyses if "utility" in a.curves]
    )
    for ax, a in zip(axes, analyses, strict=True):
        if "utility" not in a.curves:
            continue
        x, y = a.curves["utility"]
        ax.step(np.maximum(x, 1e-3), y, where="post")
        ax.axvline(1.0, color="r", ls=":", lw=1)
        fb = a.stats["pod_utility"]["fraction_below_1"]
        _log_axis(ax, "x", lo, hi)
        ax.set_xlabel("pod utility ratio (log scale)")
        _title(ax, f"{a.label}: {fb:.1%} below 1" if fb is not None else a.label)
    axes[0].set_ylabel("CDF")
    fig.suptitle("Pod utility ratio (useful lifetime / cold-start time)")
    save(fig, "pod_utility.png", "CDF of pod utility ratio; red line at 1.")


class FigureJob(NamedTuple):
    cost: float  # relative drawing cost (about CPU ms / 50)
    draw: Callable  # draw(plt, analyses, save)


def figure_jobs(analyses: list[Analysis]) -> list[FigureJob]:
    """The figures the analyses call for, in report order (costs: CPU ms / 50, measured)."""
    jobs = [
        FigureJob(1.2, _fig_cdf(g))
        for g in CDF_TITLES
        if any(g in a.curves["cdf"] for a in analyses)
    ]
    jobs += [
        FigureJob(1.1, _fig_components_time),
        FigureJob(0.9, _fig_component_shares),
        FigureJob(1.2, _fig_fit_coldstart),
    ]
    if any("gaps" in a.curves for a in analyses):
        jobs.append(FigureJob(1.2, _fig_fit_interarrival))
    jobs += [FigureJob(1.7, _fig_spearman), FigureJob(1.0, _fig_per_hour)]
    if any("per_function" in a.curves for a in analyses):
        jobs += [FigureJob(1.5, _fig_requests_vs_coldstarts), FigureJob(1.0, _fig_pod_utility)]
    return jobs
