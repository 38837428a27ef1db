"""H5: a function cannot read another function's payloads through the SDK."""

from __future__ import annotations

import msgpack
from sec_helpers import deploy


def test_ctx_alloc_never_returns_a_previous_owners_bytes(private_node):
    deploy(private_node, "victim", "size")
    deploy(private_node, "snoop", "peek_alloc")
    secret = b"TOP-SECRET-PAYLOAD-" * 6000  # ~110 KiB: lands in a 1 MiB slot, freed after
    for _ in range(3):
        assert private_node.client.invoke("victim", secret).status == 200
    # the snoop's own request is small (a 64 KiB slot); its buffer comes from the 1 MiB class,
    # where the victim's freed request slot is the first free one
    r = private_node.client.invoke(
        "snoop", msgpack.packb({"n": 200_000}), "application/msgpack"
    ).json()
    assert r["nonzero"] == 0, f"ctx.alloc() returned old bytes: {bytes.fromhex(r['sample'])!r}"
