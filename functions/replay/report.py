"""The cold-start report's HTML page: a summary table of every trace and the figures."""

from __future__ import annotations

import html

from .coldstart_trace import Analysis
from .trace_columns import COMP


def _table(rows: list[list], header: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v)) if v is not None else "–"

    h = "".join(f"<th>{html.escape(x)}</th>" for x in header)
    b = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def render_html(analyses: list[Analysis], figs: list[tuple[str, str]]) -> str:
    labels = [a.label for a in analyses]
    S_ = [a.stats for a in analyses]
    summary = _summary(S_)
    imgs = "\n".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for f, c in figs
    )
    skipped = "".join(f"<li>{html.escape(x)}</li>" for s in S_ for x in s.get("skipped_files", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Hearth cold-start report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}
figcaption{{color:#555;font-size:90%}}</style></head><body>
<h1>Cold-start report</h1>
<p>Traces: {html.escape(" | ".join(labels))}. Every statistic is in <a href="stats.json">stats.json</a>.</p>
{_table(summary, ["statistic", *labels])}
{imgs}
{"<h2>Skipped files</h2><ul>" + skipped + "</ul>" if skipped else ""}
</body></html>
"""


def _summary(S_: list[dict]) -> list[list]:
    """The summary table's rows: a statistic, then its value in each trace (None where a
    trace lacks it)."""

    def row(name, get):
        vals = []
        for s in S_:
            try:
                vals.append(get(s))
            except (KeyError, TypeError):
                vals.append(None)
        return [name, *vals]

    return [
        row("cold starts", lambda s: s["core"]["overall"]["count"]),
        row("functions", lambda s: s["core"]["overall"]["functions"]),
        row("mean cold-start time (s)", lambda s: s["core"]["overall"]["mean"]),
        row("sd (s)", lambda s: s["core"]["overall"]["sd"]),
        row(
            "p50 / p99 (s)",
            lambda s: f"{s['core']['overall']['p50']:.3g} / {s['core']['overall']['p99']:.3g}",
        ),
        row(
            "LogNormal fit mean / sd (s)",
            lambda s: (
                f"{s['fit_coldstart_lognormal']['mean']:.3g} / {s['fit_coldstart_lognormal']['sd']:.3g}"
            ),
        ),
        row(
            "KS vs fit / vs published LogNormal",
            lambda s: (
                f"{s['fit_coldstart_lognormal']['ks_vs_fit']:.3f} / {s['fit_coldstart_lognormal']['ks_vs_published']:.3f}"
            ),
        ),
        row(
            "Weibull fit mean / sd (s)",
            lambda s: (
                f"{s['fit_interarrival_weibull']['mean']:.3g} / {s['fit_interarrival_weibull']['sd']:.3g}"
            ),
        ),
        row(
            "KS vs fit / vs published Weibull",
            lambda s: (
                f"{s['fit_interarrival_weibull']['ks_vs_fit']:.3f} / {s['fit_interarrival_weibull']['ks_vs_published']:.3f}"
            ),
        ),
        row(
            "identity violations (total = sum of components)",
            lambda s: f"{s['identity']['violations']} of {s['identity']['rows']}",
        ),
        *[
            row(f"share {c}", lambda s, c=c: s["components"]["share_of_total_time"][c])
            for c in COMP
        ],
        row(
            "per-function cold-start rate (median)",
            lambda s: s["per_function"]["coldstart_rate_median"],
        ),
        row("pods with utility ratio < 1", lambda s: s["pod_utility"]["fraction_below_1"]),
        row(
            "peak-to-trough (hourly, first region)",
            lambda s: next(iter(s["peak_to_trough"].values()))["peak_to_trough_hourly"],
        ),
    ]
