"""What the `start_call` tests share: `Outcomes`, the `done` callback they give the invoker,
and `until`, a bounded poll of the node's state."""

from __future__ import annotations

import asyncio

from hearth.invoke import InvokeError, InvokeResult


class Outcomes:
    """A `done` callback that records what it was given; `one()` waits for exactly one."""

    def __init__(self) -> None:
        self.got: list[InvokeResult | InvokeError] = []
        self.came = asyncio.Event()

    def __call__(self, out: InvokeResult | InvokeError) -> None:
        self.got.append(out)
        self.came.set()

    async def one(self, timeout: float = 30) -> InvokeResult | InvokeError:
        await asyncio.wait_for(self.came.wait(), timeout)
        await asyncio.sleep(0.05)  # a second call, if any, would come meanwhile
        assert len(self.got) == 1, self.got
        return self.got[0]


async def until(cond, what: str, timeout: float = 20) -> None:
    """Poll `cond` every 20 ms until it holds; fail naming `what` after `timeout` s."""
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
