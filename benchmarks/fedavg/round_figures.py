"""The round benchmark's figures and targets, from the sets' raw rows (pure)."""

from __future__ import annotations

import statistics

from fedavg.sizes import FAN_IN, GB


def against_references(r: dict, n: int, model_bytes: int) -> None:
    """Add to a round's row its bandwidth limit, its time vs the limit and its ingestion."""
    # the limit: the round's N updates and N model downloads copied once at the bandwidth
    moved = r["server"]["bytes_received"] + n * (model_bytes + 4096)
    r["limit_s"] = moved / (r["bw_gbps"] * GB) if r["bw_gbps"] else float("inf")
    r["vs_limit"] = r["s"] / r["limit_s"]
    w = r["server"]["t_all_received"] - r["server"]["t_first_update"]
    r["ingest_gbps"] = r["server"]["bytes_received"] / w / GB if w > 0 else 0.0
    if r.get("bare_gbps"):
        r["ingest_vs_bare"] = r["ingest_gbps"] / r["bare_gbps"]


def phases_ms(r: dict) -> dict:
    """Where a round's time went (ms), from the server's stamps."""
    return {
        "round": r["round"],
        "go_to_last_model": round(r["s"] * 1e3, 1),
        "receive_window": round(
            (r["server"]["t_all_received"] - r["server"]["t_first_update"]) * 1e3, 1
        ),
        "last_received_to_published": round(
            (r["server"]["t_published"] - r["server"]["t_all_received"]) * 1e3, 1
        ),
        "published_to_all_acked": round(
            (r["server"]["t_all_acked"] - r["server"]["t_published"]) * 1e3, 1
        ),
        "waited_for_slots": round(r["server"]["receive_wait_s"] * 1e3, 1),
        "limit": round(r["limit_s"] * 1e3, 1),
        "bw_gbps": round(r["bw_gbps"], 2),
        **({"bare_gbps": round(r["bare_gbps"], 2)} if "bare_gbps" in r else {}),
    }


def summarize(h: dict) -> dict:
    """A set's figures. Each round is compared with its own references (the bandwidth and
    bare-socket samples taken right before and after it); the medians are over rounds 2+."""
    n, params = h["clients"], h["params"]
    model_bytes = params * 4
    rows = h["rounds"]
    later_rows = rows[1:] or rows
    later = [r["s"] for r in later_rows]
    for r in rows:
        against_references(r, n, model_bytes)
    vs_limit = [r["vs_limit"] for r in later_rows]
    ingest = [r["ingest_gbps"] for r in later_rows]
    vs_bare = [r["ingest_vs_bare"] for r in later_rows if "ingest_vs_bare" in r]
    bw = [x for r in rows for x in r["bw_samples"]]
    hot = [
        r["server"]["fold_faults"][0]
        + r["server"]["fold_faults"][1]
        + r["server"]["recv_faults"][0]
        + r["server"]["recv_faults"][1]
        for r in rows[1:]
    ]
    copied = sum(r["server"]["bytes_copied"] for r in rows)
    received = sum(r["server"]["bytes_received"] for r in rows)
    rss_models = (h.get("server_peak_rss", 0) - h.get("server_rss_base", 0)) / model_bytes
    errs = [r.get("max_rel_err_vs_exact") for r in rows if "max_rel_err_vs_exact" in r]
    return {
        "clients": n,
        "params": params,
        "bridge": h["bridge"],
        "transport": ("shm-in-place" if h["in_place"] else "shm") if h["shm"] else "tcp",
        "round1_s": rows[0]["s"],
        "later_best_s": min(later),
        "later_median_s": statistics.median(later),
        "bandwidth_gbps_median": statistics.median(bw) if bw else 0.0,
        "bandwidth_gbps_range": [min(bw), max(bw)] if bw else [],
        "bandwidth_limit_s": statistics.median(r["limit_s"] for r in later_rows),
        "later_median_vs_limit": statistics.median(vs_limit),
        "later_best_vs_limit": min(vs_limit),
        "ingest_gbps_median": statistics.median(ingest),
        "ingest_gbps_best": max(ingest),
        "bare_socket_gbps_median": (
            statistics.median(r["bare_gbps"] for r in later_rows) if vs_bare else None
        ),
        "ingest_vs_bare_socket": statistics.median(vs_bare) if vs_bare else None,
        "ingest_vs_bare_socket_best": max(vs_bare) if vs_bare else None,
        "bytes_copied_per_byte_received": copied / received if received else None,
        "server_peak_rss_mb": h.get("server_peak_rss", 0) / 1e6,
        "server_rss_base_mb": h.get("server_rss_base", 0) / 1e6,
        "server_rss_models": rss_models,
        "phases_ms": [phases_ms(r) for r in rows],
        "hot_path_faults_rounds2plus": hot,
        "fold_faults_rounds2plus": [r["server"]["fold_faults"] for r in rows[1:]],
        "recv_faults_rounds2plus": [r["server"]["recv_faults"] for r in rows[1:]],
        "process_faults_rounds2plus": [r["server"]["process_faults"] for r in rows[1:]],
        "new_processes_after_round1": h.get("new_processes_after_round1"),
        "slots_held_after_rounds": [r["slots_held_after"] for r in rows],
        "pool_slots_used_after_close": h.get("pool_slots_used_after_close"),
        "max_rel_err_vs_exact": max(errs) if errs else None,
        "all_clients_same_model": all(r.get("all_clients_same_model", True) for r in rows),
        "errors": h["errors"][:5],
    }


def targets(sets: list[dict]) -> dict:
    """Each target as a boolean, and ``targets_met``."""
    native = [s for s in sets if not s["bridge"]]
    shm = [s for s in native if s["transport"] == "shm-in-place"]
    tcp = [s for s in native if s["transport"] == "tcp"]
    vs_f = [s for s in sets if "vs_flower_later" in s]
    t = {
        "target_20x_vs_flower": bool(vs_f)
        and all(s["vs_flower_later"] >= 20 and s["vs_flower_round1"] >= 20 for s in vs_f),
        "target_2x_bandwidth_limit": bool(shm)
        and all(s["later_median_vs_limit"] <= 2 for s in shm),
        "target_exact": all(
            s["max_rel_err_vs_exact"] is not None
            and s["max_rel_err_vs_exact"] <= 1e-5
            and s["all_clients_same_model"]
            and not s["errors"]
            for s in sets
        )
        and all(s.get("max_rel_err_vs_flower", 0) <= 1e-5 for s in vs_f),
        "target_ingest_half_socket": bool(tcp)
        and all((s["ingest_vs_bare_socket"] or 0) >= 0.5 for s in tcp),
        "target_rss_fan_in_plus_2": all(s["server_rss_models"] <= FAN_IN + 2 for s in sets),
        "target_zero_new_processes": all(s["new_processes_after_round1"] == 0 for s in sets),
        # the receiving and fold threads, and the whole server process (fold workers included)
        "target_zero_hot_path_faults": all(
            not any(s["hot_path_faults_rounds2plus"])
            and not any(a or b for a, b in s["process_faults_rounds2plus"])
            for s in sets
        ),
        "target_slots_returned": all(
            not any(s["slots_held_after_rounds"]) and s["pool_slots_used_after_close"] == 0
            for s in sets
        ),
    }
    t["targets_met"] = all(t.values())
    return t
