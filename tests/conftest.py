"""Shared fixtures: a real redis-server on loopback for the whole session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Imported here, early: hypothesis's pytest plugin otherwise imports it lazily at session end,
# deep in the stack, where CPython 3.11.7's AST validator fails during assertion rewriting
# ("AST constructor recursion depth mismatch").
import hypothesis  # noqa: F401
import pytest
import redis
from hearth.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


# The Kubernetes API emulator (tests/controller/k8s_emulator.py) and the official client on it,
# for the controller and chart tests (any folder).
sys.path.append(str(Path(__file__).parent / "controller"))


@pytest.fixture
def emu():
    from k8s_emulator import Emulator

    e = Emulator().start()
    yield e
    e.stop()


@pytest.fixture
def api(emu):
    with emu.api_client() as c:
        yield c


def is_root() -> bool:
    return os.geteuid() == 0
