"""Fixtures: a real `hearth up` process against the test Redis (see hearth_proc.py), and two node
agents behind a front gateway."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hearth.client import Client
from hearth.redis_server import free_port
from hearth_proc import TOKEN, Hearth, start_front, start_hearth, stop_hearth
from realnode import check_dataplane


@pytest.fixture(scope="module", params=["ebpf", "unix"])
def hearth(request, redis_server, tmp_path_factory) -> Iterator[Hearth]:
    if request.param == "ebpf" and os.geteuid() != 0:
        pytest.skip("eBPF data plane needs root")
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    h = start_hearth(
        tmp_path_factory.mktemp(f"hearth-{request.param}"), redis_server.url, request.param
    )
    try:
        check_dataplane(request.param, h.mode, h.state)
    except BaseException:
        stop_hearth(h)
        raise
    yield h
    stop_hearth(h)


@pytest.fixture(scope="module")
def hearth_auto(redis_server, tmp_path_factory) -> Iterator[Hearth]:
    """One node in the default (auto) data-plane mode, for tests that need not run twice."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()  # no functions left by earlier modules
    h = start_hearth(
        tmp_path_factory.mktemp("hearth-auto"),
        redis_server.url,
        "auto",
        {"HEARTH_MAX_BODY_BYTES": str(1024 * 1024)},
    )
    try:
        check_dataplane("auto", h.mode, h.state)  # as root, auto must end up on eBPF
    except BaseException:
        stop_hearth(h)
        raise
    yield h
    stop_hearth(h)


@pytest.fixture
def two_agents_and_front(redis_url, tmp_path):
    for i in range(2):
        (tmp_path / f"n{i}").mkdir()
    agents = [
        start_hearth(tmp_path / f"n{i}", redis_url, "unix", {"HEARTH_NODE": f"node-{i}"})
        for i in range(2)
    ]
    port = free_port()
    env = {
        **os.environ,
        "HEARTH_PORT": str(port),
        "HEARTH_NODE_AGENTS": ",".join(a.url for a in agents),
    }
    c = Client(f"http://127.0.0.1:{port}", token=TOKEN, timeout=60)
    front = start_front(env, c)
    yield agents, c
    front.terminate()
    front.wait(10)
    for a in agents:
        if a.proc.poll() is None:
            stop_hearth(a)
