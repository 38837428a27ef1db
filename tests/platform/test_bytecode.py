"""A function's code is compiled when it is deployed (#19, hearth.runtime.bytecode): its first
start imports bytecode, and code edited after the deploy still runs as edited."""

from __future__ import annotations

import json
import os
import time
from importlib.util import cache_from_source
from pathlib import Path

from hearth.runtime.bytecode import compile_tree, fresh, stale

ONE = 'def h(event):\n    return {"v": "one"}\n'
TWO = 'def h(event):\n    return {"v": "two"}\n'  # the same size: only the bytes differ


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} within {timeout:g}s"
        time.sleep(0.05)


def _module(d: Path, name: str) -> Path:
    d.mkdir()
    (src := d / f"{name}.py").write_text(ONE)
    assert not (d / "__pycache__").exists()
    return src


def _invoke(h, name: str) -> dict:
    r = h.client.invoke(name, b"{}")
    assert r.status == 200, r.body
    return json.loads(r.body)


def test_the_code_is_compiled_at_deploy_and_the_first_start_uses_it(hearth_auto, tmp_path):
    src = _module(tmp_path / "code", "bc_first")
    hearth_auto.deploy(name="bc-first", handler="bc_first:h", code_path=str(src.parent))
    _wait(lambda: fresh(str(src)), "the deploy's bytecode")  # before any start
    pyc = os.stat(cache_from_source(str(src)))
    assert _invoke(hearth_auto, "bc-first") == {"v": "one"}
    after = os.stat(cache_from_source(str(src)))
    # the start imported it as it was: an import that found it stale would have replaced it
    assert (after.st_ino, after.st_mtime_ns) == (pyc.st_ino, pyc.st_mtime_ns)


def test_code_edited_after_deploy_runs_as_edited(hearth_auto, tmp_path):
    """The edit keeps the file's size and its modification time: a timestamp pyc would still
    pass for it and the old code would run."""
    src = _module(tmp_path / "code", "bc_edit")
    hearth_auto.deploy(name="bc-edit", handler="bc_edit:h", code_path=str(src.parent))
    _wait(lambda: fresh(str(src)), "the deploy's bytecode")
    st = os.stat(src)
    src.write_text(TWO)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(src).st_size == st.st_size and os.stat(src).st_mtime_ns == st.st_mtime_ns
    assert _invoke(hearth_auto, "bc-edit") == {"v": "two"}


def test_compile_tree_skips_what_is_fresh_and_reports_what_it_cannot_compile(tmp_path):
    (tmp_path / "good.py").write_text(ONE)
    (tmp_path / "bad.py").write_text("def broken(:\n")  # its import reports the error, as before
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skipped.py").write_text(ONE)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    assert compile_tree(str(tmp_path)) == (2, 1)  # good.py, pkg/__init__.py; not bad.py
    assert fresh(str(tmp_path / "good.py")) and fresh(str(tmp_path / "pkg" / "__init__.py"))
    assert not (tmp_path / ".hidden" / "__pycache__").exists()
    assert compile_tree(str(tmp_path)) == (0, 1)  # nothing stale: nothing compiled again
    (tmp_path / "good.py").write_text(TWO)
    assert not fresh(str(tmp_path / "good.py"))
    assert compile_tree(str(tmp_path)) == (1, 1)
    assert stale(str(tmp_path))  # bad.py never compiles: its deploys check and try again
    (tmp_path / "bad.py").unlink()
    assert not stale(str(tmp_path))  # nothing to compile: a deploy starts no process
