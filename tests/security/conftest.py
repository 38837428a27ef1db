"""Fixtures for the security tests: real `hearth up` processes with their own private Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hearth.localnode import LocalNode, start_node
from sec_helpers import TOKEN


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
