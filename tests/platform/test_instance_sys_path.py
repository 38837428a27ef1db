"""An instance's imports see its code directory and the installed packages, not the node
agent's working directory: `python -m` puts the current directory first on `sys.path`, and
zygotes and plain-process instances are started that way from wherever `hearth up` ran, so a
function's `import config` could load a file of the operator's. Both runners, a real node."""

from __future__ import annotations

import contextlib
import os

import pytest
from hearth.localnode import start_node


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.mark.parametrize("runner", ["zygote", "process"])
def test_the_agents_working_directory_is_not_on_an_instances_path(tmp_path, redis_url, runner):
    ops = tmp_path / "ops"
    ops.mkdir()
    (ops / "hearthcwdmod.py").write_text("SECRET = 'an operator file'\n")
    code = tmp_path / "code"
    code.mkdir()
    (code / "cwdprobe.py").write_text(
        "import sys\n\n"
        "def h(event):\n"
        "    try:\n"
        "        import hearthcwdmod  # noqa: F401\n"
        "        found = True\n"
        "    except ModuleNotFoundError:\n"
        "        found = False\n"
        "    return {'found': found, 'path': sys.path}\n"
    )
    with _cwd(ops):  # the node, and its zygotes and instances, start from here
        # an empty entry in PYTHONPATH (`export PYTHONPATH=$PYTHONPATH:/x` with it unset) is
        # the working directory too, with or without -P: dropped from the instance's
        env = {"HEARTH_RUNNER": runner, "PYTHONPATH": f":{tmp_path / 'libs'}"}
        node = start_node(tmp_path / "state", redis_url=redis_url, env=env)
    with node:
        node.client.deploy({"name": "cwdprobe", "handler": "cwdprobe:h", "code_path": str(code)})
        out = node.client.invoke("cwdprobe", b"{}", "application/json").json()
    assert out["found"] is False, out
    assert str(ops) not in out["path"] and "" not in out["path"]
    assert out["path"][0] == str(code)  # the function's own directory still leads
    assert str(tmp_path / "libs") in out["path"]  # PYTHONPATH's other entries are kept


def test_an_instances_pythonpath_keeps_only_absolute_entries():
    from hearth.runtime.env import inherited

    assert inherited({"PYTHONPATH": ":/a:rel/b::/c"})["PYTHONPATH"] == "/a:/c"
    assert "PYTHONPATH" not in inherited({"PYTHONPATH": ":."})
