"""The link's call deadlines on one loop timer (`hearth.agent.deadlines`): every call still
waiting at its deadline gets TimeoutError, answered ones are left alone, one timer is pending
at most, and answered entries do not pile up. Real event loop, no processes."""

from __future__ import annotations

import asyncio

from hearth.agent.deadlines import Deadlines


async def timed_out(fut: asyncio.Future) -> bool:
    """Whether `fut` failed with the deadline's TimeoutError (waits up to 5 s, never hangs)."""
    await asyncio.wait({fut}, timeout=5)
    return fut.done() and isinstance(fut.exception(), TimeoutError)


async def test_each_waiting_call_times_out_at_its_own_deadline_and_answered_ones_do_not() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadlines(loop)
    now = loop.time()
    late = loop.create_future()  # added first, with the latest deadline
    early = loop.create_future()
    answered = loop.create_future()
    dl.add(now + 0.30, late)
    dl.add(now + 0.05, early)  # earlier than the armed timer: re-armed for it
    dl.add(now + 0.02, answered)
    answered.set_result("reply")
    assert await timed_out(early)
    assert not late.done()  # its deadline has not come
    assert answered.result() == "reply"
    assert await timed_out(late)
    assert len(dl) == 0
    dl.close()


async def test_one_timer_for_calls_sent_in_order_and_answered_entries_are_dropped() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadlines(loop)
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    futs = []
    for _ in range(5000):  # answered at once, as warm calls are
        f = loop.create_future()
        dl.add(loop.time() + 30, f)
        f.set_result(None)
        futs.append(f)
    # one loop timer for all of them, not one each (nor 5000 cancelled ones)
    assert len(loop._scheduled) - before == 1  # type: ignore[attr-defined]
    assert len(dl) < 600  # answered entries dropped whenever the heap doubles
    waiting = loop.create_future()
    dl.add(loop.time() + 0.02, waiting)
    assert await timed_out(waiting)
    dl.close()
    assert len(loop._scheduled) == before  # type: ignore[attr-defined]


class _Reacts:
    """A call whose expiry runs its caller's code at once (as a task-free call's `done` does,
    from `Deadlines._fire` itself)."""

    def __init__(self, then) -> None:
        self._done, self.then = False, then

    def done(self) -> bool:
        return self._done

    def set_exception(self, _e: BaseException) -> None:
        self._done = True
        self.then()


async def test_a_deadline_added_by_an_expiry_is_kept_when_that_add_compacts_the_heap() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadlines(loop)
    now = loop.time()
    far, soon = loop.create_future(), loop.create_future()

    def then_many() -> None:  # enough answered entries to compact the heap, then a short one
        for _ in range(300):
            f = loop.create_future()
            f.set_result(None)
            dl.add(loop.time() + 1000, f)
        dl.add(loop.time() + 0.05, soon)

    dl.add(now + 0.01, _Reacts(lambda: dl.add(loop.time() + 300, far)))
    dl.add(now + 0.01, _Reacts(then_many))
    assert await timed_out(soon)  # not left for the 300 s timer
    assert not far.done()
    dl.close()
