"""The real trace rows the tests read: a copy of shared/data/traces (its README gives the
provenance) kept in the repo, so these tests always run — on a fresh clone too — and never skip."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "traces"
assert (DATA / "README.md").exists(), f"trace samples missing at {DATA}"
