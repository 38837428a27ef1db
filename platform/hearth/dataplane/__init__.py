"""Hearth data plane: 64-byte descriptors routed between instances, payloads in shared memory.

See docs/dataplane.md. Main entry points::

    from hearth.dataplane import Descriptor, Kind, SlotPool, Endpoint, AsyncEndpoint
"""

from hearth.dataplane.descriptor import (
    NO_SLOT,
    PROXY_ID,
    SIZE,
    Descriptor,
    Flags,
    Kind,
    Status,
    new_corr,
)
from hearth.dataplane.endpoint import (
    AsyncEndpoint,
    Endpoint,
    RegistrationError,
    proxy_mode,
    proxy_stats,
)

# the slot pool (numpy) is loaded on first use: the proxy daemon never needs it, and its start
# is part of every node restart
_SHM = {
    "PayloadTooLarge",
    "PoolError",
    "PoolExhausted",
    "Slot",
    "SlotPool",
    "StaleSlot",
    "cleanup_stale_segments",
    "payload_offset",
}


def __getattr__(name: str):
    if name in _SHM:
        from hearth.dataplane import shm

        return getattr(shm, name)
    raise AttributeError(f"module 'hearth.dataplane' has no attribute {name!r}")


__all__ = [
    "NO_SLOT",
    "PROXY_ID",
    "SIZE",
    "AsyncEndpoint",
    "Descriptor",
    "Endpoint",
    "Flags",
    "Kind",
    "PayloadTooLarge",
    "PoolError",
    "PoolExhausted",
    "RegistrationError",
    "Slot",
    "SlotPool",
    "StaleSlot",
    "Status",
    "cleanup_stale_segments",
    "new_corr",
    "payload_offset",
    "proxy_mode",
    "proxy_stats",
]
