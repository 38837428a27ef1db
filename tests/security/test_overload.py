"""Overload answers are back-pressure (503/429 + Retry-After), never 502 or 507."""

from __future__ import annotations

from hearth.agent.invoker import dataplane_error
from hearth.dataplane.descriptor import PROXY_ID, Descriptor, Kind, Status


def _err(**kw) -> Descriptor:
    return Descriptor(dst=1, kind=Kind.ERROR, **kw)


def test_a_full_pool_or_queue_is_back_pressure():
    no_slot = dataplane_error(_err(src=7, status=5, aux=507))  # the instance found no free slot
    assert (no_slot.status, no_slot.retry_after) == (503, 1)
    full = dataplane_error(_err(src=PROXY_ID, status=Status.QUEUE_FULL, aux=7))
    assert (full.status, full.retry_after) == (503, 1)  # aux is the lost dst: not a status


def test_other_data_plane_errors_are_not_back_pressure():
    assert dataplane_error(_err(src=7, status=5, aux=413)).error == "reply_too_large"
    assert dataplane_error(_err(src=7, status=5, aux=400)).status == 400
    assert dataplane_error(_err(src=7, status=5, aux=0)).status == 502
    bounced = dataplane_error(_err(src=PROXY_ID, status=Status.UNKNOWN_DST, aux=9))
    assert bounced.status == 502 and bounced.retry_after is None


def test_queueing_is_bounded_at_the_measured_handler_time():
    from hearth.agent.admitter import queue_admits

    assert queue_admits(0, 4, 0.01, 0.025)  # a free wait of 2.5 ms
    assert queue_admits(9, 4, 0.01, 0.025)  # 10 ahead on 4 slots of 10 ms: 25 ms
    assert not queue_admits(10, 4, 0.01, 0.025)  # 27.5 ms: 429 now, not a hidden wait
    assert queue_admits(10_000, 4, 0.01, None)  # no bound configured: the queue size decides
    assert queue_admits(10_000, 4, None, 0.025)  # nothing measured yet
