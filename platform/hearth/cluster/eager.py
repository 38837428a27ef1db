"""Start a coroutine eagerly: its first step runs now, in the caller (a reader callback), and
only what is left after its first real wait goes on in a task.

Why: a task created in a reader callback takes its first step one event-loop pass later (an
``epoll_wait`` and a loop iteration more). A forwarded call's first step ends where the request
has been handed to an instance, so running it at once takes that pass off every call. Python
3.12 does this itself (``eager_start``); on 3.11 a task continues the started coroutine through
:class:`_Started`. The first step runs outside any task (``asyncio.current_task()`` is None
there), so it must not need one (no ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

_EAGER = sys.version_info >= (3, 12)


def start_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine) -> asyncio.Task | None:
    """Run ``coro``'s first step now; a task runs the rest, or None if that step finished it
    (an exception it raised propagates here)."""
    if _EAGER:
        t = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
        if not t.done():
            return t
        t.result()  # what the first step raised, as below
        return None
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_Started(coro, first))


class _Started(Coroutine):
    """``coro`` after its first step (which yielded ``first``): the task running this waits on
    ``first``, then steps ``coro`` on; a cancellation, even before that, reaches ``coro``."""

    def __init__(self, coro: Coroutine, first: Any):
        self.coro, self.first, self.fresh = coro, first, True

    def send(self, value: Any) -> Any:
        if self.fresh:
            self.fresh = False
            return self.first
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.fresh = False
        return self.coro.throw(typ if val is None else val)

    def close(self) -> None:
        self.coro.close()

    def __await__(self):  # noqa: ANN204 - only ever run by a task, never awaited
        raise TypeError("a started coroutine is run by its task, not awaited")
