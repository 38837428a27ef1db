"""Invocation ids made on the hot path are valid random UUIDs."""

from __future__ import annotations

import uuid

from hearth.node import new_invocation_id


def test_new_invocation_ids_are_distinct_version_4_uuids() -> None:
    seen = set()
    for _ in range(2000):
        raw, text = new_invocation_id()
        u = uuid.UUID(text)
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert u.bytes == raw and str(u) == text
        seen.add(text)
    assert len(seen) == 2000
