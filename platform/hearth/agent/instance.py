"""What the node agent holds about one instance, whatever runs it.

`Instance` is the protocol every kind of instance meets (a local process today; a pod that
joined over the node socket or an instance on another node later): identity, where it runs,
what it holds, a `ready` future resolved by its first report, and `kill`/`exited` to end it.
The bookkeeping fields (state, inflight, served, last_used, keep_until, pending) are written
only by :class:`hearth.agent.table.InstanceTable`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hearth.dataplane.segment import proc_start
from hearth.invoke import InvokeError

log = logging.getLogger("hearth.node")

AGENT_ID = 1  # the agent's own data-plane endpoint id
POOL_RUNTIME = "python3.11"

# starting → (pooled →) idle ⇄ busy → stopping → dead
STATES = ("starting", "pooled", "idle", "busy", "stopping", "dead")


class InstanceDied(InvokeError):
    def __init__(self, function: str, instance: str, detail: str = ""):
        super().__init__(
            502,
            "instance_died",
            detail or f"instance {instance} of {function!r} exited during the invocation",
        )


@runtime_checkable
class Instance(Protocol):
    id: str
    eid: int  # data-plane endpoint id: how a Channel reaches it
    function: str | None  # None while a generic warm-pool instance
    node: str
    runtime: str
    memory_mb: int
    cpu_millicores: int
    from_pool: bool
    ready: asyncio.Future | None
    phases: dict[str, float]
    state: str
    inflight: int
    served: int
    started_at: float
    last_used: float
    keep_until: float
    pending: set[bytes]
    # (slot, generation) of the spec a pool instance was sent, until the agent frees it
    # (`Starts.spec_read`): the instance only reads it
    spec_slot: tuple[int, int] | None
    # its cold-start record while the call sent ahead of its ready report is unanswered
    after_answer: Callable[[], None] | None

    @property
    def pid(self) -> int | None: ...

    @property
    def ident(self) -> tuple[int, int] | None:
        """Its process as the slot table names owners: (pid, start time); None in another
        pid namespace (a joined pod), where its pid names nobody here."""
        ...

    @property
    def live(self) -> bool: ...

    @property
    def running(self) -> bool:
        """It exists and has not ended yet."""
        ...

    def kill(self) -> bool:
        """Force it to end now; False if it had already ended."""
        ...

    @property
    def ending(self) -> bool:
        """Killed, and still to end: a kind whose kill only asks it to end (a joined pod closes
        its end within `KILL_GRACE_S`, `JoinedInstance.kill`) says so here, and the lifecycle
        routes it no call meanwhile (`Lifecycle.kill`). False for a kind whose kill is a
        signal to its process (it has ended, or its exit is being reported)."""
        ...

    async def exited(self) -> int:
        """Wait until it has ended; its exit code."""
        ...


@dataclass
class _Held:
    """The bookkeeping every local instance carries (written by the InstanceTable)."""

    id: str
    eid: int
    function: str | None
    state: str = "starting"
    inflight: int = 0
    from_pool: bool = False
    ready: asyncio.Future | None = None
    phases: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    served: int = 0
    pending: set[bytes] = field(default_factory=set)
    node: str = "local"
    runtime: str = POOL_RUNTIME
    memory_mb: int = 128
    cpu_millicores: int = 100
    keep_until: float = float("inf")
    # its endpoint was registered with the proxy before it started (a zygote fork with an
    # endpoint from the stock): requests may be sent before it reports ready
    preregistered: bool = False
    # its process's start time (clock ticks since boot), read by its runner when it started:
    # with the pid, how the slot table names a process (a pid alone can be a joined pod's too)
    pid_start: int = 0
    # (slot, generation) of the spec a pool instance was sent: the instance only reads it (no
    # pool lock before its import), the agent frees it at its first report or its exit
    spec_slot: tuple[int, int] | None = None
    # what waits for the answer of the call sent ahead of its ready report: its cold-start
    # record (`Starts.start_instance`), made when that call's reply is in (`Lifecycle.done`)
    # or when the instance ends first (`Lifecycle.exited`)
    after_answer: Callable[[], None] | None = None

    @property
    def live(self) -> bool:
        return self.state not in ("stopping", "dead")

    @property
    def ending(self) -> bool:
        return False  # a kill is SIGKILL to its process (`Instance.ending`)

    @property
    def ident(self) -> tuple[int, int] | None:
        pid: int | None = self.pid  # type: ignore[attr-defined]  # (each kind's own)
        return (pid, self.pid_start) if pid else None

    def note_start(self, pid: int) -> None:
        """Read its process's start time, just after its runner started it (still that child:
        not reaped yet). Unreadable (the process already ended), it stays 0, which names no
        process: the instance's chained calls can lend none of its slots and its stray replies
        free none of its handed-over slots (closed, not open) -- worth a line in the log."""
        start = proc_start(pid)
        if start is None:
            log.warning(
                "instance %s: the start time of its process %d could not be read (it ended at "
                "once?): its chained calls cannot lend its slots, its stray replies free none",
                getattr(self, "id", "?"),
                pid,
            )
        self.pid_start = start or 0


@dataclass
class ProcessInstance(_Held):
    """An instance that is a child process of this agent."""

    proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def kill(self) -> bool:
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            self.proc.kill()
        except ProcessLookupError:
            return False
        return True

    async def exited(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()


@dataclass
class ForkedInstance(_Held):
    """An instance forked by the node's zygote: the zygote reaps it and reports its exit code;
    the agent signals it through a pidfd (no pid-reuse race)."""

    os_pid: int = 0
    pidfd: int = -1
    exit_code: asyncio.Future | None = None  # resolved when the zygote reports the exit

    @property
    def pid(self) -> int | None:
        return self.os_pid or None

    @property
    def running(self) -> bool:
        return self.os_pid > 0 and self.exit_code is not None and not self.exit_code.done()

    def kill(self) -> bool:
        if not self.running:
            return False
        try:
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.os_pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            return False
        return True

    async def exited(self) -> int:
        assert self.exit_code is not None
        return await asyncio.shield(self.exit_code)

    def ended(self, rc: int) -> None:
        if self.exit_code is not None and not self.exit_code.done():
            self.exit_code.set_result(rc)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
