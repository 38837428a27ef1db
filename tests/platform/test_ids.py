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


def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    """Random bytes are read 64 ids at a time; a forked child (the zygote's instances) must
    draw its own, not the rest of its parent's batch."""
    import os

    new_invocation_id()  # the parent holds unused random bytes now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"".join(new_invocation_id()[0] for _ in range(8)))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 16 * 8)
    os.close(r)
    os.close(w)
    parent = b"".join(new_invocation_id()[0] for _ in range(8))
    assert len(child) == 128
    assert {child[i : i + 16] for i in range(0, 128, 16)}.isdisjoint(
        {parent[i : i + 16] for i in range(0, 128, 16)}
    )
