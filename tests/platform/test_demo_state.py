"""`hearth demo`'s state directory: removed when the run ends cleanly, kept (and named) when it
does not, so a failed run's logs can be read. The run itself is replaced by a stand-in: the
full run is `test_demo.py`'s."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

from hearth import demo
from rich.console import Console


def _run(monkeypatch, tmp_path: Path, rc: int | None) -> tuple[BaseException | None, str, Path]:
    """`demo._demo` with a stand-in run that writes a log line into the state directory, then
    returns `rc` (None: raises). What it raised, what it printed, and its state directory."""
    seen: list[Path] = []

    async def stand_in(console, fast, out, state):
        seen.append(state)
        (state / "logs.txt").write_text("a log line\n")
        if rc is None:
            raise RuntimeError("a step failed")
        return rc

    monkeypatch.setattr(demo, "_demo_in", stand_in)
    buf = io.StringIO()
    raised: BaseException | None = None
    try:
        asyncio.run(demo._demo(Console(file=buf, width=250), True, tmp_path / "out"))
    except RuntimeError as e:
        raised = e
    assert len(seen) == 1
    return raised, buf.getvalue(), seen[0]


def test_a_clean_run_removes_its_state_directory(monkeypatch, tmp_path) -> None:
    raised, _, state = _run(monkeypatch, tmp_path, 0)
    assert raised is None
    assert not state.exists()


def test_a_failed_run_keeps_its_state_directory_and_names_it(monkeypatch, tmp_path) -> None:
    raised, printed, state = _run(monkeypatch, tmp_path, None)
    try:
        assert isinstance(raised, RuntimeError)  # the failure still reaches the caller
        assert (state / "logs.txt").read_text() == "a log line\n"
        assert f"kept in {state}" in printed
    finally:
        shutil.rmtree(state, ignore_errors=True)
