"""Hearth data plane: 64-byte descriptors routed between instances, payloads in shared memory.

See docs/dataplane.md. Main entry points::

    from hearth.dataplane import Descriptor, Kind, SlotPool, Endpoint, AsyncEndpoint

The names are resolved on first use (PEP 562), so importing one submodule (an instance imports
``descriptor``, ``endpoint`` and ``shm``, which imports ``slots``, ``owners`` and ``segment``)
does not import the others (``async_endpoint`` pulls in
asyncio).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing is not imported on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

_WHERE = {
    "NO_SLOT": "descriptor",
    "PROXY_ID": "descriptor",
    "SIZE": "descriptor",
    "Descriptor": "descriptor",
    "Flags": "descriptor",
    "Kind": "descriptor",
    "Status": "descriptor",
    "new_corr": "descriptor",
    "AsyncEndpoint": "async_endpoint",
    "Endpoint": "endpoint",
    "RegistrationError": "endpoint",
    "proxy_mode": "endpoint",
    "proxy_stats": "endpoint",
    "PayloadTooLarge": "slots",
    "PoolError": "slots",
    "PoolExhausted": "slots",
    "Slot": "slots",
    "SlotPool": "shm",
    "StaleSlot": "slots",
    "cleanup_stale_segments": "segment",
    "payload_offset": "slots",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'hearth.dataplane' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hearth.dataplane.{mod}"), name)
    globals()[name] = value
    return value
