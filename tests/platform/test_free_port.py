"""`free_port` picks ports a client socket cannot take before the server binds them: outside
the kernel's ephemeral range (the source ports of every outgoing connection), free when picked."""

from __future__ import annotations

import socket

from hearth.redis_server import _ephemeral_range, free_port


def test_free_ports_are_outside_the_ephemeral_range_and_bindable() -> None:
    lo, hi = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if lo <= p <= hi], (lo, hi)
    assert len(set(ports)) > 150  # random, not one port handed to every caller
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when picked (nothing else binds it here)
