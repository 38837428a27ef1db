"""Fixtures for the security tests: real `hearth up` processes with their own private Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hearth.localnode import LocalNode, start_node
from sec_helpers import TOKEN, deploy


@pytest.fixture(scope="module")
def private_node(tmp_path_factory) -> Iterator[LocalNode]:
    """`hearth up` that starts its own Redis, with platform secrets in its environment."""
    node = start_node(
        tmp_path_factory.mktemp("sec-node"),
        redis_url=None,
        token=TOKEN,
        dataplane="unix",
        env={
            "REDIS_PASSWORD": "platform-redis-password-42",
            "AWS_SECRET_ACCESS_KEY": "platform-cloud-secret-42",
        },
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def size_node(request, redis_server, tmp_path_factory) -> Iterator[LocalNode]:
    """`hearth up` (unix data plane, the session's Redis) with `size` deployed (it answers its
    body's length), configured by the module using it: `NODE_ENV` (HEARTH_* settings), and
    optionally `SIZE_SPEC` (more spec fields) and `NODE_CLIENT_TIMEOUT` (s)."""
    m = request.module
    node = start_node(
        tmp_path_factory.mktemp(m.__name__.rsplit(".", 1)[-1]),
        redis_url=redis_server.url,
        token=TOKEN,
        dataplane="unix",
        env=getattr(m, "NODE_ENV", {}),
        client_timeout=getattr(m, "NODE_CLIENT_TIMEOUT", 60),
    )
    try:
        deploy(node, "size", "size", **getattr(m, "SIZE_SPEC", {}))
        yield node
    finally:
        node.stop()
