"""A benchmark script (benchmarks/<name>.py, or a diagnostic in scripts/) loaded as a module, for
the tests of its parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = BENCHMARKS.parent / "scripts"


def load_benchmark(name: str, where: Path = BENCHMARKS) -> ModuleType:
    """`where`/`name`.py as the module `name`_bench (the benchmarks' scripts importable)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # (appended: nothing of the tests' own is shadowed)
    spec = importlib.util.spec_from_file_location(f"{name}_bench", where / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
