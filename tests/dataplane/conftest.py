"""Fixtures for the data-plane suite: real proxy daemons (both modes) and real /dev/shm pools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from hearth.dataplane.shm import SlotPool
from hearth.proxies.daemon import ProxyDaemon
from hearth.proxies.ebpf import ebpf_unavailable_reason

SMALL_CLASSES = [(4096, 8), (1 << 20, 4), (64 << 20, 2)]


def skip_unless_ebpf(mode: str) -> None:
    if mode == "ebpf":
        why = ebpf_unavailable_reason()
        if why:
            pytest.skip(f"eBPF mode unavailable: {why}")


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="hdp-")  # short: AF_UNIX paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=[pytest.param("ebpf", marks=pytest.mark.ebpf), "unix"])
def mode(request) -> str:
    skip_unless_ebpf(request.param)
    return request.param


@pytest.fixture
def proxy(mode, sockdir):
    """A proxy daemon serving in a thread of the test process; yields it (``.socket_path``)."""
    d = ProxyDaemon(os.path.join(sockdir, "proxy.sock"), mode).start_in_thread()
    assert d.mode == mode
    yield d
    d.stop()


@pytest.fixture
def pool():
    p = SlotPool.create(f"hearth-test-{uuid.uuid4().hex[:10]}", SMALL_CLASSES)
    yield p
    p.destroy()


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
