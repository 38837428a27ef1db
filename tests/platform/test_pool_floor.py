"""The cold-start benchmark's pool floor: real processes answering the benchmark's own client
with the worker's first-line stamp, reachable only as promised, and gone (processes and socket
directory) when its block ends, normally or by an exception."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from benchmark_module import load_benchmark
from realnode import alive

cold_start = load_benchmark("cold_start")
pool_floor = cold_start.pool_floor


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += _tree(int(child))
    return out


def _listening(port: int) -> list[str]:
    """The local addresses of the TCP listeners on `port` (from /proc/net/tcp and tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                if len(raw) == 4:  # the kernel prints each 32-bit word in host order
                    out.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    out.append(addr)
    return out


def test_a_floor_sample_is_the_workers_stamp_and_everything_ends_with_the_block(tmp_path):
    fl = pool_floor.Floor(tmp_path)
    with fl:
        u = urlsplit(fl.url)
        assert u.hostname == "127.0.0.1"
        assert _listening(u.port) == ["127.0.0.1"]  # not on the machine's other addresses
        assert stat.S_IMODE(fl.dir.stat().st_mode) == 0o700
        assert list(fl.dir.iterdir()) == []  # the worker's socket name is gone once connected
        procs = _tree(fl.proc.pid)
        assert len(procs) == 3  # the server, its worker and the sleeper
        got: list[cold_start.Timed] = []

        def call(f: pool_floor.Floor) -> float:
            # longer than one write: the server reads the whole request before relaying
            got.append(cold_start.timed_call(f, "x", bytes(5000), "application/octet-stream"))
            return got[-1].first_ms

        for _ in range(2):
            fl.sample(call)
        fl.wake_samples(2)
        assert len(fl.wakes) == 2 and all(w > 0 for w in fl.wakes)
        # the stamp is taken by the worker between the request's write and its answer
        assert fl.samples == [t.first_ms for t in got]
        assert all(0 < t.first_ms < t.answer_ms for t in got)
    assert not any(alive(p) for p in procs)
    assert not fl.dir.exists()


def test_an_exception_in_the_block_still_ends_the_floors_processes(tmp_path):
    fl = pool_floor.Floor(tmp_path)
    with pytest.raises(KeyError), fl:
        procs = _tree(fl.proc.pid)
        raise KeyError("a failed sample")
    assert len(procs) == 3 and not any(alive(p) for p in procs)
    assert not fl.dir.exists()
