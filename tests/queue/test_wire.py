"""The pure core: entry encoding/decoding rules, backoff schedule, stats arithmetic."""

from __future__ import annotations

import msgpack
import pytest
from hearth.dataplane.slots import PoolExhausted
from hearth.invoke import InvokeError, InvokeResult
from hearth.queue.stats import TriggerRef, summarize
from hearth.queue.wire import (
    MalformedEntry,
    backoff_delay,
    decode_entry,
    encode_entry,
    error_text,
    failure,
)
from hypothesis import given
from hypothesis import strategies as st


def test_backoff_doubles_and_caps():
    assert [backoff_delay(n, 0.5, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(0, 0.5, 3.0) == 0.0 and backoff_delay(10_000, 1.0, 30.0) == 30.0


@given(
    st.binary(max_size=200),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
    st.text(max_size=20),
)
def test_encode_decode_roundtrip(data, headers, inv):
    fields = encode_entry(
        data,
        "application/octet-stream",
        headers=headers,
        invocation_id=inv or None,
        reply={"ttl": 5} if inv else None,
    )
    d = decode_entry(fields)
    assert (d.data, d.content_type, d.headers, d.invocation_id) == (
        data,
        "application/octet-stream",
        headers,
        inv or None,
    )


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({}, "no fields"),
        ({b"x": b"1"}, "missing field 'd'"),
        ({b"d": b"\xc1"}, "'d' is not valid msgpack"),  # default content type is msgpack
        ({b"d": b"{", b"ct": b"application/json"}, "'d' is not valid JSON"),
        ({b"d": b"", b"ct": b"\xff"}, "'ct' (content type) is not ASCII"),
        (
            {b"d": b"", b"ct": b"text/plain", b"m": msgpack.packb({"headers": {"a": 1}})},
            "'headers' must be a map of strings",
        ),
        (
            {b"d": b"", b"ct": b"text/plain", b"m": msgpack.packb({"reply": {"ttl": 1}})},
            "needs an 'invocation_id'",
        ),
        ({b"d": b"", b"v": b"2"}, "unsupported format version"),
    ],
)
def test_malformed_reasons(fields, reason):
    with pytest.raises(MalformedEntry) as e:
        decode_entry(fields)
    assert reason in str(e.value)


def test_minimal_foreign_entry_is_accepted():
    """An entry written by another tool with just `d` (msgpack) is a valid event."""
    d = decode_entry({b"d": msgpack.packb({"a": 1})})
    assert d.content_type == "application/msgpack" and d.headers == {}


def test_error_text_prefers_json_error_detail():
    assert (
        error_text(500, b'{"error": "ValueError", "detail": "bad"}')
        == "status 500: ValueError: bad"
    )
    assert error_text(502, b"plain") == "status 502: plain"


def test_failure_names_the_error_and_whether_the_attempt_counts():
    assert failure(InvokeResult(200, b"ok")) == (None, True)
    assert failure(InvokeResult(500, b'{"error": "ValueError", "detail": "bad"}')) == (
        "status 500: ValueError: bad",
        True,
    )
    # the platform never handed the event to a handler: retried, not counted
    assert failure(InvokeError(503, "overloaded")) == ("status 503: overloaded", False)
    assert failure(InvokeError(500, "cold_start_failed", "exit 1"))[1] is False
    assert failure(InvokeError(404, "not_found", "no such function")) == (
        "status 404: not_found: no such function",
        True,
    )
    assert failure(PoolExhausted("no free slot")) == ("PoolExhausted: no free slot", False)
    assert failure(MemoryError()) == ("MemoryError: ", False)
    assert failure(RuntimeError("invoker bug")) == ("RuntimeError: invoker bug", True)


def test_summarize_lag_fallbacks():
    ref = TriggerRef("s", "g")
    assert (
        summarize(
            ref, 10, {"pending": 2, "lag": 3, "consumers": 1}, 1, [b"5", None, b"5"], b"7"
        ).to_dict()["backlog"]
        == 5
    )
    s = summarize(ref, 10, {"pending": 0, "lag": None, "entries-read": 4}, 0, [], None)
    assert s.lag == 6 and s.delivery_rate == 0
    assert summarize(ref, 4, None, 0, [], None).lag == 4  # no group yet: everything is lag
