"""What a request sent ahead of a start is answered when it fails (`agent.outcomes.start_error`):
an instance that died before its ready report failed its start (`cold_start_failed`, which a
queue trigger does not count as a delivery), whether the agent first sees its exit (which fails
`ready`) or the data plane's word that the request could not reach it (`InstanceDied` while
`ready` is still pending). Under load the second came first and the caller got `instance_died`
(CI rehearsal 60, 8 Dec 2026: `test_local_backend.py::test_request_sent_ahead_of_a_failed_
start_is_answered_and_freed[exits]`)."""

from __future__ import annotations

import asyncio

from hearth.agent.instance import InstanceDied
from hearth.agent.outcomes import start_error
from hearth.invoke import InvokeError


async def test_died_before_its_report_is_a_failed_start_in_either_order():
    loop = asyncio.get_running_loop()
    died = InstanceDied("f", "f-1", "instance f-1 is not registered with the proxy")

    pending = loop.create_future()  # the death seen first: `ready` not settled yet
    e = start_error(pending, died)
    assert e is not None and (e.status, e.error) == (502, "cold_start_failed")
    assert "not registered with the proxy" in e.detail

    failed = loop.create_future()  # the exit seen first: `ready` failed with the start's error
    why = InvokeError(502, "cold_start_failed", "instance f-1 exited with code 3 before ready")
    failed.set_exception(why)
    assert start_error(failed, died) is why
    failed.exception()  # (retrieved)


async def test_other_ends_are_left_as_they_are():
    loop = asyncio.get_running_loop()
    died = InstanceDied("f", "f-1")
    assert start_error(None, died) is None  # not sent ahead of a start
    pending = loop.create_future()
    # not a death: the caller's own error stands (a refusal, a bad reply)
    assert start_error(pending, InvokeError(502, "bad_reply", "x")) is None
    assert start_error(pending, None) is None
    ready = loop.create_future()
    ready.set_result({})  # the start succeeded: a death after it is the call's own
    assert start_error(ready, died) is None
    cancelled = loop.create_future()
    cancelled.cancel()
    assert start_error(cancelled, died) is None
