"""`Outcomes`: the `done` callback the `start_call` tests give the invoker."""

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
