"""The cold-start benchmark's bare baselines for a new process: a fork+exec of Python, and a
fork() of a parent that has imported what the zygote imports (what a zygote fork costs with no
Hearth code in it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def bare_fork_exec(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-c", "import time; print(repr(time.time()))"],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append((float(r.stdout) - t0) * 1000)
    return out


def bare_fork(n: int) -> list[float]:
    """fork() of this process after importing what the zygote imports."""
    import hearth.runtime.instance  # noqa: F401
    import msgpack  # noqa: F401
    import numpy  # noqa: F401

    out = []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(time.time()).encode())
            os._exit(0)
        os.close(w)
        t1 = float(os.read(r, 64))
        os.close(r)
        os.waitpid(pid, 0)
        out.append((t1 - t0) * 1000)
    return out
