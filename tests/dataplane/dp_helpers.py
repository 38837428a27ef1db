"""Helpers shared by the data-plane tests (a uniquely named module: other suites have conftests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import realnode
from hearth.proxies.ebpf import ebpf_unavailable_reason


def skip_unless_ebpf(mode: str) -> None:
    """eBPF tests skip only where eBPF cannot work (not root). As root, `make test` installs bcc
    and the headers, so a broken install fails the tests instead of hiding behind a skip."""
    if mode == "ebpf":
        why = ebpf_unavailable_reason()
        if why and os.geteuid() == 0:
            pytest.fail(f"running as root but eBPF does not load: {why}")
        if why:
            pytest.skip(f"eBPF mode needs root: {why}")


def start_daemon_process(path: str, mode: str) -> subprocess.Popen:
    """`python -m hearth.proxies.daemon` as a real process; waits for its socket."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hearth.proxies.daemon", "--socket", path, "--mode", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # printed once the socket is bound
    if "mode=" not in line:
        proc.kill()
        raise RuntimeError(f"daemon did not start: {line!r} {proc.stderr.read()}")
    return proc


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    return realnode.wait_for(pred, timeout, what, every=0.02)
