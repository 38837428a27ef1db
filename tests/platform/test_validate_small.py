"""`gateway.body.validate_small`, the warm path's body check: a content type's format is looked up
in a bounded cache, which answers as the parse itself does (JSON, +json, msgpack, anything else
unchecked; an empty body passes), and a client sending a new content type on every call fills it
to its bound and no further, with every answer still right; a type seen after the cache is full
is cached too, in the place of the one cached first (the cache once kept its first types for
good: every later type paid the full check on each call), except the usual types, which stay
cached whatever other types a client sends."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
from hearth.gateway import body as body_mod
from hearth.gateway.body import KINDS_MAX, validate_small


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    """Each test starts from the cache as the module starts it, its pinned types only (it is
    the module's: other tests fill it too)."""
    fresh = {t: body_mod._kind(t) for t in body_mod._PINNED}
    body_mod._KINDS.clear()
    body_mod._KINDS.update(fresh)
    yield
    body_mod._KINDS.clear()
    body_mod._KINDS.update(fresh)


def test_the_format_follows_the_content_type_with_or_without_the_cache():
    cases = [
        ("application/json", b"{", False),
        ("application/json", b"{}", True),
        ("Application/JSON; charset=utf-8", b"[1", False),
        ("application/problem+json", b"nope", False),
        ("application/msgpack", msgpack.packb({"a": 1}), True),
        ("application/x-msgpack", b"\xc1", False),
        ("text/plain", b"{", True),
        ("application/json", b"", True),  # empty: nothing to parse
    ]
    for _ in range(2):  # the first round fills the cache, the second reads it
        for ctype, raw, ok in cases:
            assert (validate_small(ctype, raw) is None) is ok, (ctype, raw)


def test_new_content_types_fill_the_cache_to_its_bound_only():
    for i in range(KINDS_MAX * 3):
        assert validate_small(f"application/x-{i}+json", b"{") is not None  # still parsed
        assert validate_small(f"text/x-{i}", b"{") is None
    assert len(body_mod._KINDS) == KINDS_MAX


def test_a_type_seen_after_the_cache_filled_is_cached_in_the_oldest_ones_place():
    for i in range(KINDS_MAX):
        validate_small(f"text/x-{i}", b"{")
    assert len(body_mod._KINDS) == KINDS_MAX
    assert validate_small("application/late+json", b"{") is not None  # parsed: JSON
    assert body_mod._KINDS.get("application/late+json") == "json"  # cached, not left out
    assert len(body_mod._KINDS) == KINDS_MAX and "text/x-0" not in body_mod._KINDS
    assert validate_small("application/late+json", b"{}") is None  # read from the cache
    # a stream of new types: the cache holds the last KINDS_MAX of them, nothing more
    for i in range(KINDS_MAX, KINDS_MAX * 3):
        validate_small(f"text/x-{i}", b"{")
        assert len(body_mod._KINDS) == KINDS_MAX
    others = KINDS_MAX - len(body_mod._PINNED)
    assert list(body_mod._KINDS) == [
        *body_mod._PINNED,
        *(f"text/x-{i}" for i in range(KINDS_MAX * 3 - others, KINDS_MAX * 3)),
    ]
    assert validate_small("text/x-0", b"{") is None  # evicted, still answered right


def test_the_usual_types_stay_cached_whatever_other_types_come():
    for i in range(KINDS_MAX * 10):
        validate_small(f"text/x-{i}", b"{")
    assert len(body_mod._KINDS) == KINDS_MAX
    for t in ("application/json", "application/msgpack", "application/octet-stream"):
        assert t in body_mod._KINDS, t
    assert body_mod._KINDS["application/json"] == "json"
    assert validate_small("application/json", b"{") is not None  # still parsed as JSON
