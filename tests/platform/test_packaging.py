"""Layout guarantees: `platform/` never shadows the standard library; every package is listed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_platform_is_stdlib_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not out.startswith(str(ROOT)), out
    assert Path(out).name == "platform.py"


def test_pytest_style_sys_path_still_gets_stdlib_platform():
    code = "import sys; sys.path.insert(0, '.'); import platform; print(platform.python_implementation())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "CPython"


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {"hearth": ROOT / "platform" / "hearth"}
    roots.update({pkg: ROOT / d for pkg, d in cfg["package-dir"].items() if pkg})
    found = set()
    for pkg, d in roots.items():
        for init in d.rglob("__init__.py"):
            rel = init.parent.relative_to(d)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            if "__pycache__" not in name:
                found.add(name)
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
