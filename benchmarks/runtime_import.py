"""How long ``import hearth.runtime.instance`` takes (issue #19: ≤ 30 ms), beside baselines in the
same run: a standard-library import of similar weight (``asyncio``) and, optionally, the runtime of
other git revisions. Every plain-process instance pays this import before its handler's own.

Each sample is a fresh interpreter's ``python -X importtime -c "import M"``: the cumulative
microseconds of M's own line. Variants run interleaved (A, B, C, A, B, C, ...) so a shared
machine's load drifts over all of them alike; bytecode is written once before timing (the
shell's ``PYTHONDONTWRITEBYTECODE`` is dropped for the runs). Prints each variant's median and
minimum, the ratios, the modules the import adds, and ends with one JSON line.

    .venv/bin/python benchmarks/runtime_import.py [--quick] [--rev main] [--rev 0e57ce5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from revtree import checkout  # noqa: E402  (a revision's platform/, by git archive)

TARGET_MS = 30.0
MODULE = "hearth.runtime.instance"
BASELINE = "asyncio"


def env_for(platform: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(platform)
    return env


def import_us(module: str, env: dict[str, str]) -> int:
    """Cumulative microseconds of `module`'s line in a fresh interpreter's -X importtime."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in reversed(r.stderr.splitlines()):
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module and not parts[2].startswith("  "):
            return int(parts[1])
    raise RuntimeError(f"no importtime line for {module}:\n{r.stderr[-2000:]}")


def new_modules(module: str, env: dict[str, str]) -> list[str]:
    probe = (
        "import sys, json; before = set(sys.modules)\n"
        f"import {module}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="15 samples per variant instead of 40")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument(
        "--rev", action="append", default=[], help="also time this git revision's runtime"
    )
    a = ap.parse_args()
    n = a.samples or (15 if a.quick else 40)
    here = ROOT / "platform"
    variants: dict[str, tuple[str, dict[str, str]]] = {
        "this tree": (MODULE, env_for(here)),
        f"baseline: import {BASELINE}": (BASELINE, env_for(here)),
    }
    with tempfile.TemporaryDirectory(prefix="hearth-import-") as tmp:
        for k, rev in enumerate(a.rev):
            variants[f"rev {rev}"] = (MODULE, env_for(checkout(rev, Path(tmp) / f"r{k}")))
        for module, env in variants.values():  # bytecode first: timed imports read it
            subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(n):
            for name, (module, env) in variants.items():
                samples[name].append(import_us(module, env) / 1000)
        modules = {
            name: len(new_modules(module, env))
            for name, (module, env) in variants.items()
            if module == MODULE
        }
    load = os.getloadavg()[0]
    med = {name: statistics.median(v) for name, v in samples.items()}
    base = med[f"baseline: import {BASELINE}"]
    print(f"`python -X importtime -c 'import M'`, {n} interleaved samples each, load {load:.1f}")
    print(f"{'variant':<34}{'median ms':>10}{'min ms':>9}{'vs asyncio':>12}{'modules':>9}")
    for name, v in samples.items():
        mods = modules.get(name, "")
        print(f"{name:<34}{med[name]:>10.1f}{min(v):>9.1f}{med[name] / base:>11.2f}×{mods:>9}")
    for name in variants:
        if name.startswith("rev "):
            print(f"this tree / {name}: {med['this tree'] / med[name]:.2f}×")
    out = {
        "benchmark": "runtime_import",
        "samples": n,
        "runtime_import_ms": round(med["this tree"], 2),
        "runtime_import_min_ms": round(min(samples["this tree"]), 2),
        "asyncio_import_ms": round(base, 2),
        "ratio_vs_asyncio": round(med["this tree"] / base, 3),
        "modules": modules["this tree"],
        "revs": {
            name[4:]: {"ms": round(med[name], 2), "modules": modules[name]}
            for name in variants
            if name.startswith("rev ")
        },
        "loadavg_at_end": round(load, 2),
        "target_runtime_import_le_30ms": med["this tree"] <= TARGET_MS,
    }
    out["targets_met"] = out["target_runtime_import_le_30ms"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
