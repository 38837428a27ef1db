"""Redis commands of a queue runner retried across lost connections: the errors that mean "the
link dropped" (`NET_ERRORS`), and `net_retry`, which repeats a write until Redis answers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("hearth.queue")

NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


async def net_retry(stream: str, stopping: asyncio.Event, what: str, fn: Any) -> tuple[bool, Any]:
    """Run fn(attempt) until Redis answers -> (True, value); gives up -> (False, None) only
    when stopping and Redis stays down. For acks, dead-lettering and result writes."""
    delay, deadline, attempt = 0.05, None, 0
    while True:
        try:
            return True, await fn(attempt)
        except NET_ERRORS as e:
            attempt += 1
            if stopping.is_set():
                deadline = deadline or time.monotonic() + 10.0
                if time.monotonic() > deadline:
                    log.error("%s: giving up on %s after stop: %s", stream, what, e)
                    return False, None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
