"""Fixtures for the data-plane suite: real proxy daemons (both modes) and real /dev/shm pools."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest
from dp_helpers import skip_unless_ebpf
from hearth.dataplane.shm import SlotPool
from hearth.proxies.daemon import ProxyDaemon

SMALL_CLASSES = [(4096, 8), (1 << 20, 4), (64 << 20, 2)]


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
