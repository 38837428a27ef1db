"""`make test`: the suite in three pytest processes at once (the parts of `SPLIT`: the container
cluster tests, mostly waiting on podman; the function, chart and controller tests; and the rest),
so their waits overlap.

    python scripts/run_tests.py [pytest args]      (make test PYTEST_ARGS="...")

Each part's lines are streamed with a `[suite]` / `[cluster]` / `[functions]` prefix and kept whole in
`build/test/<part>.log`; a failed part's report (from its first `===` line) is printed again,
unprefixed, at the end, then one line per part with its exit code. The exit code is non-zero if
any part failed; a part that selected no test (pytest's 5, e.g. under `-k`) is not a failure
while another ran tests. Ctrl-C reaches all (one process group); SIGTERM/SIGHUP are passed on
as SIGINT, so fixtures tear down (containers, nodes), and anything still running after a grace
period is killed.

Arguments that name paths (`tests/functions`, `tests/x.py::test_y`), or HEARTH_TEST_SERIAL=1,
run one pytest as before."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = "tests/cluster"
# The suite mostly waits (on processes, sockets, containers): ~40 % of two cores over a serial
# run. Parts run at once; each has its own session Redis, ports and state dirs, and no test
# checks machine-wide state (the audit in docs/testing.md). The function tests (numerical,
# CPU-bound) go beside the node tests (waiting), the container cluster beside both.
SPLIT: list[tuple[str, list[str]]] = [
    ("cluster", [CLUSTER, "tests/security"]),  # the kill loop and slow clients wait too
    ("functions", ["tests/functions", "tests/charts", "tests/controller"]),
]
# Two parts (functions inside the suite) ran while three at once made timing-bound tests fail
# in CI rehearsals; those waits are on states now, with margins of many times (docs/testing.md:
# "Under contention").
BASE = ["-q", "-p", "no:cacheprovider"]
NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED
GRACE_S = 120  # after an interrupt: time for the cluster's teardown before a kill


@dataclass
class Part:
    name: str
    argv: list[str]


def names_paths(args: list[str], root: Path = ROOT) -> bool:
    """Whether the pytest arguments select paths themselves (then they run as given)."""
    return any(not a.startswith("-") and (root / a.split("::")[0]).exists() for a in args)


def plan(args: list[str], root: Path = ROOT, serial: bool = False) -> list[Part]:
    """The pytest runs for these arguments: one when they name paths (or `serial`, or a part's
    folders are missing), else one per part of `SPLIT` plus the rest of the suite."""
    if (
        serial
        or names_paths(args, root)
        or not all((root / d).is_dir() for _, ds in SPLIT for d in ds)
    ):
        return [Part("suite", [*BASE, *args])]
    ignore = [f"--ignore={d}" for _, ds in SPLIT for d in ds]
    return [Part("suite", [*BASE, *ignore, *args])] + [
        Part(name, [*BASE, *args, *ds]) for name, ds in SPLIT
    ]


def combine(codes: list[int]) -> int:
    """One exit code for the parts: the first failure; 'no tests' only if no part ran any."""
    failed = [c for c in codes if c not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(c == NO_TESTS for c in codes) else 0


SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed)\b.* in [\d.]+s")


def summary(log: str) -> str:
    """pytest's closing line ("N passed … in Ts"), even when a stray message from a process
    that outlived the tests was printed after it; else the log's last line."""
    lines = log.strip().splitlines()
    for line in reversed(lines):
        if SUMMARY.search(line):
            return line.strip("= ")
    return lines[-1] if lines else "(no output)"


def report(log: str) -> str:
    """The part of a pytest -q log worth reprinting: from its first `===` section on."""
    lines = log.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if re.sub(r"\x1b\[[0-9;]*m", "", line).startswith("==="):  # coloured or not
            return "".join(lines[i:])
    return log


def _per_part(path: str, name: str) -> str:
    """`phases.jsonl` -> `phases-cluster.jsonl`: parts never write one file."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix}"))


def _pump(proc: subprocess.Popen[bytes], prefix: str, log: Path, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    with log.open("wb") as f:
        for line in iter(proc.stdout.readline, b""):
            f.write(line)
            f.flush()
            with lock:  # whole lines only: parts never mix within a line
                sys.stdout.buffer.write(prefix.encode() + line)
                sys.stdout.buffer.flush()


def run(parts: list[Part], cwd: Path = ROOT, logdir: Path = ROOT / "build/test") -> int:
    """Run the parts at once (one: straight to the terminal, as before); their exit code."""
    python = sys.executable
    if len(parts) == 1:
        return subprocess.call([python, "-m", "pytest", *parts[0].argv], cwd=cwd)
    logdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if sys.stdout.isatty():  # through the pipe pytest would drop its colours
        env["PY_COLORS"] = "1"
    cpu_out = env.get("HEARTH_CPUTIME_OUT")  # scripts/pytest_cputime.py: one file per part
    width = max(len(p.name) for p in parts) + 3
    lock = threading.Lock()
    procs: list[subprocess.Popen[bytes]] = []
    pumps = []
    interrupted = False

    def interrupt(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupt)
    # Started in the background by a shell without job control (`cmd &` in a script, some CI
    # runners) the runner has SIGINT ignored, and a child inherits an ignored signal: the SIGINT
    # passed on never reached pytest, and the parts were killed at GRACE_S without their
    # teardown (nodes, containers left). A handled signal is reset to the default at exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for p in parts:
        proc = subprocess.Popen(
            [python, "-m", "pytest", *p.argv],
            cwd=cwd,
            env={**env, "HEARTH_CPUTIME_OUT": _per_part(cpu_out, p.name)} if cpu_out else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        t = threading.Thread(
            daemon=True,
            target=_pump,
            args=(proc, f"[{p.name}]".ljust(width), logdir / f"{p.name}.log", lock),
        )
        t.start()
        procs.append(proc)
        pumps.append(t)
    codes = []
    deadline = 0.0
    for proc in procs:
        while True:
            try:
                codes.append(proc.wait(1))
                break
            except KeyboardInterrupt:  # Ctrl-C: the children got it too; wait for teardown
                interrupted = True
            except subprocess.TimeoutExpired:
                pass
            if interrupted:
                deadline = deadline or time.monotonic() + GRACE_S
                if time.monotonic() > deadline:
                    proc.kill()
    for t in pumps:  # a stray grandchild may hold the pipe open: do not wait for it forever
        t.join(10)
    for p, code in zip(parts, codes, strict=True):
        if code not in (0, NO_TESTS):
            log = (logdir / f"{p.name}.log").read_text(errors="replace")
            print(f"\n######## {p.name} failed (exit {code}): its report, whole log in {logdir}")
            print(report(log), end="", flush=True)
    print()
    for p, code in zip(parts, codes, strict=True):
        log = (logdir / f"{p.name}.log").read_text(errors="replace")
        print(f"[{p.name}] exit {code}: {summary(log)}")
    return 130 if interrupted else combine(codes)


def main() -> int:
    args = sys.argv[1:]
    return run(plan(args, serial=os.environ.get("HEARTH_TEST_SERIAL") == "1"))


if __name__ == "__main__":
    sys.exit(main())
