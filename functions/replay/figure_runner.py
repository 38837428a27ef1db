"""Draws the report's figures: here, or split in two sets of about equal cost with a forked
process drawing one of them when a core is idle. A child that fails, hangs or dies leaves its
figures to this process: no figure is ever left out."""

from __future__ import annotations

import json
import os
import select
import threading
import time
import traceback
import warnings
from pathlib import Path

from .coldstart_trace import Analysis
from .figures import FigureJob, Saver, figure_jobs, pyplot

FIGURE_WORKERS = 2  # processes drawing figures (HEARTH_FIGURE_WORKERS=1: all in this process)
FIGURE_TIMEOUT_S = 300.0  # a stuck figure process is killed and its figures drawn here


def _draw(jobs: list[FigureJob], analyses: list[Analysis], out: Path) -> list[list]:
    """Draw ``jobs`` here; per job, the (file, caption) pairs written."""
    plt = pyplot()
    res = []
    for job in jobs:
        save = Saver(plt, out)
        job.draw(plt, analyses, save)
        res.append(save.made)
    return res


def _split(jobs: list[FigureJob]) -> tuple[list[int], list[int]]:
    """Two job sets of about equal cost (largest first, each to the lighter set)."""
    a: list[int] = []
    b: list[int] = []
    ca, cb = 0.0, 0.0
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i].cost):
        if ca <= cb:
            a.append(i)
            ca += jobs[i].cost
        else:
            b.append(i)
            cb += jobs[i].cost
    return sorted(a), sorted(b)


def _runnable_elsewhere() -> float:
    """Tasks runnable right now in other processes: all runnable tasks (``/proc/loadavg``)
    minus this process's own running threads (``/proc/self/task``; e.g. polars workers that
    have not gone to sleep yet); else the 1-minute load average. The instantaneous count is
    used because a load average also counts this process's own last minute (a benchmark
    that just ran pandas looks busy)."""
    try:
        with open("/proc/loadavg") as fh:
            runnable = int(fh.read().split()[3].split("/")[0])
        mine = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as fh:
                    mine += fh.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
        return max(0, runnable - max(mine, 1))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def figure_workers() -> int:
    """HEARTH_FIGURE_WORKERS if set; else FIGURE_WORKERS when a core is idle (fewer tasks
    runnable elsewhere than cores), else 1: on a saturated machine a second process only adds
    the cost of the fork."""
    env = os.environ.get("HEARTH_FIGURE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return FIGURE_WORKERS if cpus >= 2 and _runnable_elsewhere() < cpus else 1


def figures(
    analyses: list[Analysis], out: Path, workers: int | None = None
) -> list[tuple[str, str]]:
    """Write PNGs into ``out``; returns (file name, caption) in report order. One panel per
    trace.

    With ``workers`` >= 2 (default: see :func:`figure_workers`) and ``os.fork`` available,
    the figures are split in two sets of about equal cost: a forked child (see
    :class:`_FigureChild`) draws one set while this process draws the other."""
    out = Path(out)
    jobs = figure_jobs(analyses)
    workers = figure_workers() if workers is None else workers
    if workers < 2 or len(jobs) < 2 or not hasattr(os, "fork"):
        return [m for made in _draw(jobs, analyses, out) for m in made]
    mine, theirs = _split(jobs)
    child = _FigureChild([jobs[i] for i in theirs], analyses, out)
    return _gather(jobs, analyses, out, mine, child)


def _gather(
    jobs: list[FigureJob], analyses: list[Analysis], out: Path, mine: list[int], child
) -> list[tuple[str, str]]:
    """Draw ``mine`` here, then take the rest from ``child`` (drawn here if it failed)."""
    theirs = [i for i in range(len(jobs)) if i not in mine]
    try:
        results = dict(zip(mine, _draw([jobs[i] for i in mine], analyses, out), strict=True))
    except BaseException:
        if child is not None:
            child.kill()
        raise
    done = child.result() if child is not None else None
    if done is None:  # no child, or it failed: draw its figures here
        done = _draw([jobs[i] for i in theirs], analyses, out)
    results.update(zip(theirs, done, strict=True))
    return [m for i in range(len(jobs)) for m in results[i]]


class _FigureChild:
    """A forked process drawing ``jobs``. It touches only matplotlib and the numpy arrays in
    ``Analysis.curves`` (never polars, whose thread pool does not survive a fork), reports the
    files it wrote through a pipe and leaves with ``os._exit``. ``result()`` is None if it
    failed, hung (``FIGURE_TIMEOUT_S``) or died: its figures are then drawn by the caller,
    so figures are never left out. Fork only when no thread of this process is working."""

    def __init__(self, jobs: list[FigureJob], analyses: list[Analysis], out: Path):
        import gc

        pyplot()  # imported before the fork: the child inherits it
        self.r, w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork + threads
            self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child process (its coverage is not collected)
            code = 1
            try:
                os.close(self.r)
                gc.disable()  # short-lived; never runs finalizers of the parent's objects
                payload = json.dumps({"made": _draw(jobs, analyses, out)})
                code = 0
            except BaseException:  # noqa: BLE001 - reported to the parent
                payload = json.dumps({"error": traceback.format_exc()})
            try:
                data = payload.encode()
                while data:
                    data = data[os.write(w, data) :]
                os.close(w)  # the parent reads EOF now, not after this big process is torn down
            finally:
                os._exit(code)
        os.close(w)

    def kill(self) -> None:
        import signal

        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.r)

    def result(self) -> list[list] | None:
        import signal

        chunks = []
        deadline = time.monotonic() + FIGURE_TIMEOUT_S
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.r], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)  # stuck: draw its figures here
                    break
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except BaseException:
            self.kill()
            raise
        os.close(self.r)
        try:
            msg = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            msg = {}
        if "made" in msg:  # complete, so the child is exiting: reap it without waiting here
            if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                threading.Thread(target=os.waitpid, args=(self.pid, 0), daemon=True).start()
            return [[tuple(m) for m in made] for made in msg["made"]]
        os.waitpid(self.pid, 0)  # it failed, hung (killed above) or died
        if "error" in msg:
            warnings.warn(f"figure process failed, drawing here: {msg['error']}", stacklevel=3)
        return None
