"""Function code for the security tests: what a curious or hostile function author would try."""

from __future__ import annotations

import os

from hearth.sdk import Event


def environ(event: Event) -> dict:
    """Everything the function can see of its environment, including the raw initial one."""
    with open("/proc/self/environ", "rb") as f:
        raw = f.read().decode("utf-8", "replace")
    return {"environ": dict(os.environ), "proc_environ": raw}


def size(event: Event) -> dict:
    return {"bytes": len(event.payload)}


def peek_alloc(event: Event) -> dict:
    """Allocate a buffer and report any bytes a previous owner left in it."""
    n = int(event.data().get("n", 1 << 16))
    buf = event.context.alloc(n)
    data = bytes(buf)
    return {"nonzero": sum(1 for b in data if b), "sample": data[:64].hex()}
