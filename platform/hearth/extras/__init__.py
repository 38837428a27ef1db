"""Optional dependencies of the built-in functions: a clear ImportError naming the extra.

The core install (gateway, node agent, controller, runtime) carries none of them. A module of a
built-in function that cannot work without its extra imports the guard first
(``import hearth.extras.replay``), so importing it without the extra says what to install
instead of failing deep inside on a bare ``No module named 'polars'``. (fedavg has none: its
numba kernels fall back to numpy.)
"""

from __future__ import annotations

import importlib.util


def require(extra: str, *modules: str) -> None:
    """Raise ImportError naming ``pip install 'hearth[<extra>]'`` if a top-level module is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"this part of Hearth needs {', '.join(missing)}: pip install 'hearth[{extra}]'",
            name=missing[0],
        )


# The extras and the modules each one installs (top-level names, checked without importing).
EXTRAS: dict[str, tuple[str, ...]] = {
    "vecsearch": ("numba", "pyarrow"),
    "replay": ("polars", "pyarrow", "scipy", "matplotlib"),
    "flower": ("flwr",),
}
