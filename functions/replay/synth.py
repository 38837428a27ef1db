"""Synthetic traces in the real Huawei/Azure schemas, following the Huawei paper's published fits.

Why: the real traces are multi-GB downloads that are not reachable here; scale tests and
benchmarks need data with the same columns and known statistics. Every file written is labelled
synthetic (parquet key-value metadata, or a ``<file>.meta.json`` sidecar for CSV so the CSV
itself stays byte-compatible with the public notebooks).

What follows the paper: cold-start duration LogNormal(mean 3.24 s, sd 7.10 s); time between cold
starts Weibull(mean 1.25 s, sd 3.66 s). What is an assumption (documented in docs/traces.md, all
overridable): component shares, runtime/trigger/pool mixes, popularity (Zipf), requests per pod.
"""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import optimize, special

from . import schemas as S

PUBLISHED = {
    "coldstart_lognormal": {"mean": 3.24, "sd": 7.10},
    "interarrival_weibull": {"mean": 1.25, "sd": 3.66},
}

# Assumed mixes (not published as numbers we can cite; chosen to resemble the sample rows).
DEFAULT_SHARES = {
    "podAllocationCost": 0.02,
    "deployCodeCost": 0.18,
    "deployDependencyCost": 0.30,
    "schedulingCost": 0.50,
}
DEFAULT_RUNTIMES = {
    "Python3": 0.42,
    "Node.js": 0.22,
    "Java": 0.18,
    "http": 0.10,
    "Go": 0.05,
    "custom": 0.03,
}
DEFAULT_TRIGGERS = {
    "APIG-S": 0.38,
    "workflow-S": 0.18,
    "TIMER-A": 0.14,
    "unknown-unknown": 0.12,
    "OBS-A": 0.06,
    "DMS-A": 0.05,
    "APIG-S TIMER-A": 0.04,
    "SMN-A": 0.03,
}
DEFAULT_POOLS = {
    "pool22-300-128": 0.55,
    "pool23-400-256": 0.17,
    "pool24-600-512": 0.11,
    "pool26-1000-1024": 0.08,
    "pool30-1800-2048": 0.05,
    "pool34-3400-4096": 0.025,
    "pool35-6600-8192": 0.015,
}
# Relative cold-start slowness (log-scale shift used only to rank-couple totals to attributes;
# the marginal stays exactly LogNormal).
RUNTIME_EFFECT = {
    "Python3": 0.0,
    "Node.js": -0.2,
    "Java": 0.8,
    "http": 0.3,
    "Go": -0.4,
    "custom": 0.5,
}


def lognormal_params(mean: float, sd: float) -> tuple[float, float]:
    """(mu, sigma) of the LogNormal with this mean and standard deviation."""
    s2 = math.log1p((sd / mean) ** 2)
    return math.log(mean) - s2 / 2, math.sqrt(s2)


def lognormal_moments(mu: float, sigma: float) -> tuple[float, float]:
    mean = math.exp(mu + sigma**2 / 2)
    return mean, mean * math.sqrt(math.expm1(sigma**2))


def weibull_params(mean: float, sd: float) -> tuple[float, float]:
    """(shape k, scale lam) of the Weibull with this mean and standard deviation."""
    cv2 = (sd / mean) ** 2

    def f(logk: float) -> float:
        k = math.exp(logk)
        return special.gammaln(1 + 2 / k) - 2 * special.gammaln(1 + 1 / k) - math.log1p(cv2)

    k = math.exp(optimize.brentq(f, math.log(0.02), math.log(50.0)))
    lam = mean / math.exp(special.gammaln(1 + 1 / k))
    return k, lam


def weibull_moments(k: float, lam: float) -> tuple[float, float]:
    g1 = math.exp(special.gammaln(1 + 1 / k))
    g2 = math.exp(special.gammaln(1 + 2 / k))
    return lam * g1, lam * math.sqrt(max(g2 - g1 * g1, 0.0))


@dataclass
class SynthParams:
    rows: int = 100_000  # cold starts (summed over regions)
    seed: int = 0
    regions: int = 1
    clusters: int = 4
    functions: int | None = None  # default: max(50, rows // 400)
    users: int | None = None
    coldstart_mean: float = 3.24
    coldstart_sd: float = 7.10
    gap_mean: float = 1.25
    gap_sd: float = 3.66
    span_days: float | None = None  # rescale the gap scale so each region spans this many days
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    dependency_fraction: float = 0.35  # functions that install dependencies at cold start
    runtimes: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RUNTIMES))
    triggers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TRIGGERS))
    pools: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    zipf_s: float = 1.1
    requests_per_pod_mean: float = 8.0  # per-request table: requests served by one pod

    def metadata(self, kind: str) -> dict:
        return {
            "synthetic": True,
            "generator": "hearth.functions.replay.synth",
            "kind": kind,
            "published_fits": PUBLISHED,
            "params": asdict(self),
        }


def _choice(rng: np.random.Generator, mix: dict[str, float], n: int) -> np.ndarray:
    names = np.array(list(mix.keys()), dtype=object)
    p = np.array(list(mix.values()), dtype=float)
    return names[rng.choice(len(names), size=n, p=p / p.sum())]


def _hex_ids(rng: np.random.Generator, n: int, nbytes: int = 24) -> pl.Series:
    table = np.array([f"{i:02x}" for i in range(256)], dtype="S2")
    raw = table[rng.integers(0, 256, (n, nbytes), dtype=np.uint8)].view(f"S{2 * nbytes}").ravel()
    return pl.Series(raw).cast(pl.String)


def functions_table(p: SynthParams, rng: np.random.Generator) -> pl.DataFrame:
    """The function population: ids, pool, runtime, triggers, popularity, dependencies."""
    nf = p.functions or max(50, p.rows // 400)
    nu = p.users or max(10, nf // 4)
    func_name = rng.permutation(np.arange(1, nf * 3))[:nf]
    user = rng.integers(1, nu + 1, nf)
    pool = _choice(rng, p.pools, nf)
    runtime = _choice(rng, p.runtimes, nf)
    trig = _choice(rng, p.triggers, nf)
    weight = 1.0 / np.arange(1, nf + 1) ** p.zipf_s
    weight = rng.permutation(weight)
    deps = rng.random(nf) < p.dependency_fraction
    cpu = np.array([int(x.split("-")[1]) for x in pool])
    df = pl.DataFrame(
        {
            "funcName": func_name.astype(str),
            "userID": user.astype(str),
            "poolName": pool.astype(str),
            "runtime": runtime.astype(str),
            "triggerType-invocationType": trig.astype(str),
            "cpu_request": (cpu / 3).round(0),
            "weight": weight / weight.sum(),
            "has_deps": deps,
        }
    )
    return df.with_columns(
        pl.concat_str(["funcName", "userID", "poolName"], separator="---").alias("funcID")
    )


def coldstarts(p: SynthParams) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(cold-start table, function table). Pure function of ``p`` (seeded)."""
    rng = np.random.default_rng(p.seed)
    funcs = functions_table(p, rng)
    n = p.rows
    fidx = rng.choice(funcs.height, size=n, p=funcs["weight"].to_numpy())

    # cold-start totals: exact LogNormal marginal, rank-coupled to runtime and pool size
    mu, sigma = lognormal_params(p.coldstart_mean, p.coldstart_sd)
    totals = np.sort(rng.lognormal(mu, sigma, n))
    rt = funcs["runtime"].to_numpy()[fidx]
    eff = np.vectorize(RUNTIME_EFFECT.get, otypes=[float])(rt, 0.0)
    pool_cpu = np.array([int(x.split("-")[1]) for x in funcs["poolName"].to_list()])[fidx]
    key = eff + 0.25 * np.log(pool_cpu / 300.0) + rng.normal(0, 1.0, n)
    total = np.empty(n)
    total[np.argsort(key, kind="stable")] = totals

    # component shares: Dirichlet around the mean shares; no dependency phase for some functions
    names = list(S.COMPONENTS)
    base = np.array([p.shares[c] for c in names], dtype=float)
    base = base / base.sum()
    alpha = np.maximum(base * 8.0, 1e-3)
    shares = rng.dirichlet(alpha, n)
    deps = funcs["has_deps"].to_numpy()[fidx]
    shares[~deps, 2] = 0.0
    shares /= shares.sum(axis=1, keepdims=True)
    comps = np.round(shares * total[:, None], 6)
    total = comps.sum(axis=1)  # identity holds exactly on the written values

    # arrival times: per region, iid Weibull gaps (optionally rescaled to span_days)
    region_of = rng.integers(0, p.regions, n)
    k, lam = weibull_params(p.gap_mean, p.gap_sd)
    times = np.empty(n)
    for r in range(p.regions):
        idx = np.flatnonzero(region_of == r)
        gaps = lam * rng.weibull(k, idx.size)
        if p.span_days:
            gaps *= p.span_days * 86400.0 / max(gaps.sum(), 1e-9) * (1 - 1e-9)
        times[idx] = np.cumsum(gaps)
    pod_no = rng.permutation(n) + rng.integers(1, 10**8)
    df = pl.DataFrame(
        {
            "day": (times // 86400).astype(np.int64),
            "time": np.round(times, 6),
            "clusterName": (rng.integers(1, p.clusters + 1, n)).astype(str),
            "funcName": funcs["funcName"].to_numpy()[fidx],
            "userID": funcs["userID"].to_numpy()[fidx],
            "requestID": _hex_ids(rng, n),
            S.TOTAL: np.round(total, 6),
            "podAllocationCost": comps[:, 0],
            "deployCodeCost": comps[:, 1],
            "deployDependencyCost": comps[:, 2],
            "schedulingCost": comps[:, 3],
            "_pool": funcs["poolName"].to_numpy()[fidx],
            "_pod": pod_no,
            "_region": region_of,
        }
    )
    df = df.with_columns(
        pl.concat_str(
            [pl.col("_pool"), pl.col("_pod").cast(pl.String).str.zfill(10)], separator="-"
        ).alias("podID"),
        (pl.lit("R") + (pl.col("_region") + 1).cast(pl.String)).alias("region"),
    ).drop(["_pool", "_pod", "_region"])
    df = df.sort(["region", "time"])
    return df, funcs


def runtime_table(funcs: pl.DataFrame) -> pl.DataFrame:
    return funcs.select(["funcID", "cpu_request", "runtime", "triggerType-invocationType"])


def requests(p: SynthParams, cold: pl.DataFrame, funcs: pl.DataFrame) -> pl.DataFrame:
    """Per-request rows consistent with the cold starts: each pod serves a geometric number of
    requests (mean depends on the function), spaced by exponential gaps after its cold start."""
    rng = np.random.default_rng(p.seed + 1)
    fi = {f: i for i, f in enumerate(funcs["funcName"].to_list())}
    fidx = np.array([fi[f] for f in cold["funcName"].to_list()]) if cold.height < 50_000 else None
    if fidx is None:
        m = pl.DataFrame({"funcName": funcs["funcName"], "_i": np.arange(funcs.height)})
        fidx = cold.select("funcName").join(m, on="funcName", how="left")["_i"].to_numpy()
    per_func_mean = np.exp(rng.normal(math.log(p.requests_per_pod_mean), 1.0, funcs.height))
    per_func_gap = np.exp(rng.normal(math.log(2.0), 1.0, funcs.height))
    per_func_exec = np.exp(rng.normal(math.log(0.05), 1.0, funcs.height))
    nreq = rng.geometric(1.0 / (1.0 + per_func_mean[fidx]))  # >= 1
    owner = np.repeat(np.arange(cold.height), nreq)
    first = np.r_[0, np.cumsum(nreq)[:-1]]
    pos = np.arange(owner.size) - np.repeat(first, nreq)
    gaps = rng.exponential(per_func_gap[fidx][owner])
    gaps[pos == 0] = 0.0
    # cumulative gaps within each pod
    cs = np.cumsum(gaps)
    offs = cs - np.repeat(cs[first], nreq)
    t0 = cold["time"].to_numpy()[owner] + cold[S.TOTAL].to_numpy()[owner]
    t = t0 + offs
    run = rng.lognormal(np.log(per_func_exec[fidx][owner]), 0.5)
    worker = rng.exponential(0.0002, owner.size)
    front = rng.exponential(0.0005, owner.size)
    bus = rng.exponential(0.001, owner.size)
    rb = rng.exponential(3e-5, owner.size)
    wr = rng.exponential(1e-5, owner.size)
    tw = worker + run
    df = pl.DataFrame(
        {
            "time_worker": np.round(t, 6),
            "time_frontend": np.round(t + rng.exponential(0.001, owner.size), 6),
            "requestID": _hex_ids(rng, owner.size),
            "clusterName": cold["clusterName"].to_numpy()[owner],
            "funcName": cold["funcName"].to_numpy()[owner],
            "podID": cold["podID"].to_numpy()[owner],
            "userID": cold["userID"].to_numpy()[owner],
            "totalCost_worker": np.round(tw, 6),
            "workerCost": np.round(worker, 6),
            "runtimeCost": np.round(run, 6),
            "totalCost_frontend": np.round(tw + front + bus + rb + wr, 6),
            "frontendCost": np.round(front, 6),
            "busCost": np.round(bus, 6),
            "readBodyCost": np.round(rb, 6),
            "writeRspCost": np.round(wr, 6),
            "cpu_usage": np.round(rng.uniform(0, 0.4, owner.size), 6),
            "memory_usage": np.round(rng.normal(32, 4, owner.size).clip(8), 6),
            "requestBodySize": rng.integers(1, 2048, owner.size).astype(float),
            "region": cold["region"].to_numpy()[owner],
        }
    )
    return df.sort(["region", "time_worker"])


def azure2021(req: pl.DataFrame) -> pl.DataFrame:
    """Azure 2021 layout from per-request rows (app = user, func = function, end = start + dur)."""
    return req.select(
        pl.col("userID").alias("app"),
        pl.col("funcName").alias("func"),
        (pl.col("time_worker") + pl.col("runtimeCost")).round(6).alias("end_timestamp"),
        pl.col("runtimeCost").round(3).alias("duration"),
    ).sort("end_timestamp")


# --------------------------------------------------------------------------------------------
# writing (thin I/O shell)


def write_frame(df: pl.DataFrame, path: Path, meta: dict) -> Path:
    """Write CSV / CSV.gz / parquet with the synthetic label (parquet metadata or sidecar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith(".parquet"):
        df.write_parquet(
            path, metadata={"hearth.synthetic": "true", "hearth.meta": json.dumps(meta)}
        )
        return path
    if name.endswith(".gz"):
        import gzip

        with gzip.open(path, "wb", compresslevel=3) as fh:
            df.write_csv(fh)
    else:
        df.write_csv(path)
    sidecar = path.with_name(path.name + ".meta.json")
    sidecar.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def read_label(path: str | Path) -> dict | None:
    """The synthetic label of a file written by :func:`write_frame` (None for real data)."""
    p = Path(path)
    if p.name.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        kv = pq.ParquetFile(p).metadata.metadata or {}
        raw = kv.get(b"hearth.meta")
        return json.loads(raw) if raw else None
    side = p.with_name(p.name + ".meta.json")
    return json.loads(side.read_text()) if side.exists() else None


def _write_daily(
    df: pl.DataFrame, root: Path, day_col: str, ext: str, meta: dict, split_region: bool
):
    written = []
    groups = df.partition_by("region", as_dict=True) if split_region else {("all",): df}
    for (region,), part in groups.items():
        d = root / str(region) if split_region else root
        days = part[day_col].unique().sort().to_list() if day_col in part.columns else []
        keep = [c for c in part.columns if c != "region"]
        for day in days:
            sub = part.filter(pl.col(day_col) == day).select(keep)
            written.append(write_frame(sub, d / f"day{int(day):02d}{ext}", meta))
    return written


def write_dataset(
    p: SynthParams,
    out: str | Path,
    fmt: str = "csv",
    daily: bool = True,
    with_requests: bool = False,
) -> dict[str, list[Path]]:
    """Write a Huawei-layout dataset: cold_start/<region>/dayNN, runtime_triggerType/, and
    optionally per_request/<region>/dayNN (and an Azure 2021 file derived from it)."""
    root = Path(out)
    ext = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet"}[fmt]
    cold, funcs = coldstarts(p)
    written: dict[str, list[Path]] = {}
    meta = p.metadata("huawei-coldstart")
    if daily:
        written["huawei-coldstart"] = _write_daily(
            cold, root / "cold_start", "day", ext, meta, True
        )
    else:
        written["huawei-coldstart"] = [write_frame(cold, root / f"cold_start{ext}", meta)]
    written["huawei-runtime"] = [
        write_frame(
            runtime_table(funcs),
            root / "runtime_triggerType" / f"df_funcID_runtime_triggerType{ext}",
            p.metadata("huawei-runtime"),
        )
    ]
    if with_requests:
        req = requests(p, cold, funcs)
        rmeta = p.metadata("huawei-request")
        if daily:
            req = req.with_columns((pl.col("time_worker") // 86400).cast(pl.Int64).alias("_day"))
            out_files = []
            for (region, day), part in req.partition_by(["region", "_day"], as_dict=True).items():
                out_files.append(
                    write_frame(
                        part.drop(["_day", "region"]),
                        root / "per_request" / str(region) / f"day{int(day):02d}{ext}",
                        rmeta,
                    )
                )
            written["huawei-request"] = sorted(out_files)
        else:
            written["huawei-request"] = [
                write_frame(req.drop("region"), root / f"per_request{ext}", rmeta)
            ]
        written["azure2021"] = [
            write_frame(azure2021(req), root / f"azure2021{ext}", p.metadata("azure2021"))
        ]
    return written
