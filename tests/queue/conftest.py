"""Queue test fixtures (the redis-server itself comes from tests/conftest.py)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis


@pytest.fixture
async def ar(redis_url):
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()
