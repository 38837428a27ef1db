"""The fold benchmark's figures (pure): a set's ratios and checks, its report, the summary."""

from __future__ import annotations

# the figures of each set copied into the summary (rounded) and its booleans
SUMMARY_FIGURES = (
    "ratio_tree_warm_vs_flower_first_call",
    "ratio_tree_warm_vs_flower_repeated_call",
    "ratio_tree_cold_vs_flower_first_call",
    "ratio_one_warm_vs_flower_repeated_call",
    "ratio_tree_warm_vs_flower_inplace",
    "ratio_strategy_hearth_vs_flower",
    "ratio_tree_plus_ingest_round1_vs_flower_first_call",
    "ratio_tree_plus_ingest_round2plus_vs_flower_repeated_call",
    "warm_5x_needs_gbps",
    "bandwidth_pass_gbps",
    "read_pass_gbps",
    "hearth_fraction_of_bandwidth_pass",
    "hearth_fraction_of_read_pass",
    "ingest_round1_gbps",
    "ingest_round2_default_trim_gbps",
    "ingest_round2plus_gbps",
    "ingest_after_prefault_gbps",
    "leaf_read_first_access_gbps",
    "leaf_read_pages_kept_gbps",
    "max_rel_err_vs_flower",
    "max_rel_err_vs_exact",
)
SUMMARY_FLAGS = (
    "warm_5x_exceeds_bandwidth_pass",
    "warm_5x_exceeds_read_pass",
    "target_5x_vs_first_call",
    "target_5x_vs_repeated_call",
    "check_peak_models_le_fan_in_plus_2",
    "check_zero_new_accumulators_after_round1",
    "check_zero_process_starts_after_round1",
)
CHECKS = (
    "check_peak_models_le_fan_in_plus_2",
    "check_zero_new_accumulators_after_round1",
    "check_zero_process_starts_after_round1",
)


def derive(out: dict, tree: dict, one: dict, ingest_s: float, ingest1_s: float, fan_in: int):
    """A set's ratios vs Flower, the bandwidth argument, the 5x targets and the checks, added
    to ``out`` (which holds the contenders' and references' figures)."""
    out["hearth_tree"] = tree
    out["hearth_one"] = one
    first_s = out["flower_aggregate_first"]["s"]
    rep = out["flower_aggregate_repeated"]
    warm = tree["warm"]
    out["ratio_tree_warm_vs_flower_first_call"] = first_s / warm["s"]
    out["ratio_tree_warm_vs_flower_repeated_call"] = rep["s"] / warm["s"]
    out["ratio_tree_cold_vs_flower_first_call"] = first_s / tree["cold"]["s"]
    out["ratio_one_warm_vs_flower_repeated_call"] = rep["s"] / one["warm"]["s"]
    out["ratio_tree_warm_vs_flower_inplace"] = out["flower_aggregate_inplace"]["s"] / warm["s"]
    # end to end: a round's ingestion through the gateway plus the tree's fold
    out["ratio_tree_plus_ingest_round2plus_vs_flower_repeated_call"] = rep["s"] / (
        warm["s"] + ingest_s
    )
    out["ratio_tree_plus_ingest_round1_vs_flower_first_call"] = first_s / (warm["s"] + ingest1_s)
    # the bandwidth argument: what 5x Flower's repeated call would need, against what the
    # memory system moves in this run
    out["warm_5x_needs_gbps"] = 5 * rep["gbps"]
    out["bandwidth_pass_gbps"] = out["bare_add"]["gbps"]
    out["read_pass_gbps"] = out["read_pass"]["gbps"]
    out["warm_5x_exceeds_bandwidth_pass"] = out["warm_5x_needs_gbps"] > out["bandwidth_pass_gbps"]
    out["warm_5x_exceeds_read_pass"] = out["warm_5x_needs_gbps"] > out["read_pass_gbps"]
    out["hearth_fraction_of_bandwidth_pass"] = warm["gbps"] / out["bandwidth_pass_gbps"]
    out["hearth_fraction_of_read_pass"] = warm["gbps"] / out["read_pass_gbps"]
    out["target_5x_vs_first_call"] = out["ratio_tree_warm_vs_flower_first_call"] >= 5
    out["target_5x_vs_repeated_call"] = out["ratio_tree_warm_vs_flower_repeated_call"] >= 5
    out["check_peak_models_le_fan_in_plus_2"] = (
        tree["peak_working_models_per_aggregator"] <= fan_in + 2 + 0.01
    )
    out["check_zero_new_accumulators_after_round1"] = warm["new_accumulators"] == 0
    out["check_zero_process_starts_after_round1"] = (
        warm["process_starts"] == 0 and one["warm"]["process_starts"] == 0
    )


def report(out: dict) -> str:
    """A set's closing lines: ratios, bandwidth, targets and checks."""
    tree = out["hearth_tree"]
    warm = tree["warm"]
    err = out["max_rel_err_vs_flower"]
    return (
        f"  tree warm vs flower aggregate(): first call {out['ratio_tree_warm_vs_flower_first_call']:.1f}x, "
        f"repeated call {out['ratio_tree_warm_vs_flower_repeated_call']:.1f}x; "
        f"vs aggregate_inplace() {out['ratio_tree_warm_vs_flower_inplace']:.1f}x; "
        f"1 aggregator vs repeated call {out['ratio_one_warm_vs_flower_repeated_call']:.1f}x; "
        f"HearthFedAvg vs FedAvg.aggregate_fit {out['ratio_strategy_hearth_vs_flower']:.1f}x\n"
        f"  incl. ingestion via gateway: round 1 vs first call {out['ratio_tree_plus_ingest_round1_vs_flower_first_call']:.2f}x, "
        f"round 2+ vs repeated call {out['ratio_tree_plus_ingest_round2plus_vs_flower_repeated_call']:.2f}x\n"
        f"  bandwidth: 5x the repeated call needs {out['warm_5x_needs_gbps']:.2f} GB/s; "
        f"np.add pass {out['bandwidth_pass_gbps']:.2f} GB/s"
        f"{' (EXCEEDED)' if out['warm_5x_exceeds_bandwidth_pass'] else ''}, read-only pass "
        f"{out['read_pass_gbps']:.2f} GB/s{' (EXCEEDED)' if out['warm_5x_exceeds_read_pass'] else ''}; "
        f"hearth tree warm = {out['hearth_fraction_of_bandwidth_pass']:.2f} of the np.add pass, "
        f"{out['hearth_fraction_of_read_pass']:.2f} of the read pass\n"
        f"  target_5x_vs_first_call {out['target_5x_vs_first_call']}, "
        f"target_5x_vs_repeated_call {out['target_5x_vs_repeated_call']}; "
        f"peak {tree['peak_working_models_per_aggregator']:.3f} models/aggregator, {tree['peak_models_per_aggregator']:.3f} incl. the top's kept model "
        f"(check_peak_models_le_fan_in_plus_2 {out['check_peak_models_le_fan_in_plus_2']}); "
        f"new accumulators / process starts after round 1: {warm['new_accumulators']} / {warm['process_starts']}; "
        f"max rel err vs Flower {err:.1e}, vs exact {out['max_rel_err_vs_exact']:.1e}"
    )


def set_figures(r: dict) -> dict:
    """One set's entries of the summary, its name as their prefix."""
    k = r["set"]
    summary: dict = {}
    for key in SUMMARY_FIGURES:
        summary[f"{k}_{key}"] = round(r[key], 7 if "err" in key else 3)
    for key in SUMMARY_FLAGS:
        summary[f"{k}_{key}"] = bool(r[key])
    summary[f"{k}_clients"] = r["clients"]
    summary[f"{k}_slot_write_round1_gbps"] = round(r["slot_write_round1"]["gbps"], 3)
    summary[f"{k}_slot_write_round2plus_gbps"] = round(r["slot_write_round2plus"]["gbps"], 3)
    summary[f"{k}_prefault_s"] = round(r["ingest_round1_after_prefault"]["prefault_s"], 3)
    for f in ("first", "repeated"):
        summary[f"{k}_flower_aggregate_{f}_call_gbps"] = round(
            r[f"flower_aggregate_{f}"]["gbps"], 3
        )
        summary[f"{k}_flower_aggregate_{f}_call_rss_mb"] = round(
            r[f"flower_aggregate_{f}"]["rss_mb"], 1
        )
    summary[f"{k}_flower_inplace_gbps"] = round(r["flower_aggregate_inplace"]["gbps"], 3)
    summary[f"{k}_flower_inplace_rss_mb"] = round(r["flower_aggregate_inplace"]["rss_mb"], 1)
    for v in ("tree", "one"):
        h = r[f"hearth_{v}"]
        summary[f"{k}_hearth_{v}_warm_s"] = round(h["warm"]["s"], 4)
        summary[f"{k}_hearth_{v}_warm_gbps"] = round(h["warm"]["gbps"], 3)
        summary[f"{k}_hearth_{v}_cold_gbps"] = round(h["cold"]["gbps"], 3)
        summary[f"{k}_hearth_{v}_warm_rss_mb"] = round(h["warm"]["rss_mb"], 1)
        summary[f"{k}_hearth_{v}_cold_rss_mb"] = round(h["cold"]["rss_mb"], 1)
        summary[f"{k}_hearth_{v}_new_accumulators_after_round1"] = h["warm"]["new_accumulators"]
        summary[f"{k}_hearth_{v}_process_starts_after_round1"] = h["warm"]["process_starts"]
    for m in ("peak_models_per_aggregator", "peak_working_models_per_aggregator"):
        summary[f"{k}_hearth_tree_{m}"] = round(r["hearth_tree"][m], 3)
    return summary


def platform_figures(trim: str, pr: dict) -> dict:
    """The summary's entries of the platform rounds with one trim policy."""
    return {
        f"platform_trim_{trim}_round1_gbps": round(pr["round1_gbps"], 3),
        f"platform_trim_{trim}_round2plus_gbps": round(pr["round2plus_gbps"], 3),
        f"platform_trim_{trim}_process_starts_after_round1": pr["process_starts_after_round1"],
    }


def targets(results: list[dict]) -> dict:
    """The issue's target: >= 5x Flower aggregate() throughput. Flower's time depends on whether
    its allocator is warm (a repeated call reuses the 2N+1 models the previous call freed), so
    the target is reported against both calls, never against a mix; and the checks, over every
    set."""
    out = {}
    for t in ("target_5x_vs_first_call", "target_5x_vs_repeated_call"):
        out[t] = all(r[t] for r in results)
    for c in CHECKS:
        out[c] = all(r[c] for r in results)
    return out
