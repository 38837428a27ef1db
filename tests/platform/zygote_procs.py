"""What the tests of zygotes on a ZygoteRunner of real zygote processes share
(`test_zygote_abort`, `test_zygote_hang`): the runner (no proxy: the instances it starts exit
at once), the zygote processes this test process started, waits on them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from hearth.agent.zygote import ZygoteRunner


def zygotes_of_mine() -> set[int]:
    """Live zygote processes this test process started."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == os.getpid() and fields[0] != b"Z" and b"hearth.runtime.zygote" in cmd:
            out.add(int(d))
    return out


def kill_all(pids: set[int]) -> None:
    """Kill `pids` (stopped ones too); one already ended (reaped meanwhile: asyncio's child
    watcher reaps a zygote as it exits) is no error."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def _no_exit_hook(inst, rc: int) -> None:
    """The runner's `on_exit`: awaited for each instance's end (a plain lambda returned None,
    which the runner's watcher then failed to await, logging "Task exception was never
    retrieved" for every instance)."""


def zygote_runner(tmp_path, monkeypatch, name: str, first: str | None = None, **kw) -> ZygoteRunner:
    """A ZygoteRunner of real zygotes (no proxy: the instances it starts exit at once) whose
    zygotes import the module `first` (its source) before anything else, if given."""
    preload = None
    if first is not None:
        (tmp_path / "zygote_first.py").write_text(first)
        path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
        monkeypatch.setenv("PYTHONPATH", path)
        preload = ["zygote_first"]
    return ZygoteRunner(
        None,
        preload=preload,
        pool_name=name,
        proxy_socket=str(tmp_path / "none.sock"),
        log_dir=None,
        on_started=lambda inst: None,
        on_exit=_no_exit_hook,
        **kw,
    )


async def booting_pid(runner: ZygoteRunner, key: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        z = runner._booting.get(key)
        if z is not None and z.proc is not None:
            return z.proc.pid
        await asyncio.sleep(0.02)
    raise AssertionError("the zygote was not spawned")


async def zygote_gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pid not in zygotes_of_mine():
            return True
        await asyncio.sleep(0.05)
    return False
