"""vecsearch

numba's on-disk cache (`cache=True`) checks only the source file of the function it compiled:
the scan kernels inline helpers from `row_kernels.py` and `fastscan.py`, and an edit to those
would leave their cached machine code stale. So on import the compiled kernels' sources are hashed
together, and a cache written for other sources is dropped (it is rebuilt on first use)."""

from __future__ import annotations

import hashlib
from pathlib import Path

# every file holding compiled (numba) functions: a kernel inlines helpers from the others
_KERNEL_FILES = (
    "row_kernels.py",
    "filter_kernels.py",
    "plan_kernels.py",
    "osq_kernels.py",
    "rq_kernels.py",
    "fastscan.py",
    "build_kernels.py",
)


def _drop_stale_numba_cache(here: Path = Path(__file__).parent) -> None:
    cache = here / "__pycache__"
    stamp = cache / "kernels.sources"
    try:
        h = hashlib.sha256()
        for name in _KERNEL_FILES:
            h.update((here / name).read_bytes())
        if stamp.exists() and stamp.read_text() == h.hexdigest():
            return
        for name in _KERNEL_FILES:
            for f in cache.glob(f"{Path(name).stem}.*.nb[ic]"):
                f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(h.hexdigest())
    except OSError:  # sources absent or a read-only install: leave numba's cache as it is
        pass


_drop_stale_numba_cache()
