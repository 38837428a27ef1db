"""Another git revision's ``platform/`` on disk, for the benchmarks' ``--rev REV`` A/B runs: a
node started with ``PYTHONPATH`` at it runs that revision's code beside this tree's, in the same
run (a shared machine's load then drifts over both alike)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout(rev: str, into: Path) -> Path:
    """The `platform/` of `rev` (the working tree for '.'): what a version's agents import."""
    if rev == ".":
        return ROOT / "platform"
    into.mkdir(parents=True)
    got = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "platform"], capture_output=True)
    if got.returncode != 0:  # a mistyped revision: say so, not a traceback
        err = got.stderr.decode(errors="replace").strip()
        raise SystemExit(f"error: cannot read revision {rev!r}: {err}")
    tar = got.stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return into / "platform"


def platform_of(rev: str | None, tmp: Path) -> Path | None:
    """`rev`'s `platform/` at `tmp`/rev (None without a revision). Call it before anything is
    started: a revision git cannot read removes `tmp` and exits with git's message, so a
    mistyped one leaves no node running and no directory behind."""
    if not rev:
        return None
    try:
        return checkout(rev, tmp / "rev")
    except SystemExit:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
