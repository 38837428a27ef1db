"""Whose turn it is to write on a stream socket that several asyncio writers share: a message
written in parts must never have another cut into it, and messages go out in the order they
were begun. Used by the agent-to-agent link (``hearth.cluster.writer``) and the agent's
data-plane endpoint (``hearth.dataplane.async_endpoint``)."""

from __future__ import annotations

import asyncio


class WriteLock(asyncio.Lock):
    """An ``asyncio.Lock`` (first come, first served) a writer outside any task can take too."""

    def idle(self) -> bool:
        """Nobody is writing and nobody waits to: a message written now cannot cut into another
        nor overtake one waiting its turn (between a release and the waiter's turn the lock
        reads unlocked), and a part left over takes the lock at once."""
        return not self.locked() and not self._waiters

    def take_now(self) -> None:
        """Take the idle lock without a wait (outside any task, e.g. in a reader callback): the
        message whose first part just went out keeps the socket until ``release``."""
        assert self.idle()
        self._locked = True
