"""`gateway.body.validate_small`, the warm path's body check: a content type's format is looked up
in a bounded cache, which answers as the parse itself does (JSON, +json, msgpack, anything else
unchecked; an empty body passes), and a client sending a new content type on every call fills it
to its bound and no further, with every answer still right."""

from __future__ import annotations

import msgpack
from hearth.gateway import body as body_mod
from hearth.gateway.body import KINDS_MAX, validate_small


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
