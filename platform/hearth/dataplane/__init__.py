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
from hearth.dataplane.shm import (
    PayloadTooLarge,
    PoolError,
    PoolExhausted,
    Slot,
    SlotPool,
    StaleSlot,
    cleanup_stale_segments,
    payload_offset,
)

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
