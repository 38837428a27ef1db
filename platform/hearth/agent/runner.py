"""Runners start, specialise, stop and watch instances; the agent never knows which it holds.

`Runner` is the small interface (Fission's executor types are the model); `ProcessRunner`
runs each instance as a child process of the agent (``python -m hearth.runtime.instance``).
A runner reports an instance's end through `on_exit(instance, exit_code)`; it writes no
instance state (the table does).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from hearth.agent.instance import AGENT_ID, POOL_RUNTIME, Instance, ProcessInstance
from hearth.agent.link import DataplaneLink
from hearth.dataplane.descriptor import Descriptor, Flags
from hearth.runtime.env import instance_env
from hearth.runtime.instance import RunSpec, write_slot
from hearth.runtime.zygote import pdeathsig
from hearth.spec import FunctionSpec

# A spec's marks: the instance leaves the slot to us (an unmarked spec it frees itself), and may
# write its ready report back in it (`Reader.dispatch` takes it from that instance). Made once:
# the enum's `|` is three Python calls on every pool start's path (#19).
SPEC_FLAGS = Flags.SPEC | Flags.SPEC_REPORT

log = logging.getLogger("hearth.node")

ExitHook = Callable[[Instance, int], Awaitable[None]]


class Runner(Protocol):
    async def spawn(
        self, spec: FunctionSpec | None, node: str, instance_id: str | None = None
    ) -> tuple[Instance, float]:
        """Start a new instance (of `spec`, or a generic pool one): (instance, time spawned).
        Its `ready` future resolves with its cold-start phases when it reports."""
        ...

    def specialise(self, inst: Instance, spec: FunctionSpec, hold: bool = False) -> float:
        """Turn a ready pool instance into an instance of `spec` (its spec is sent now, or with
        this loop step's flush: no coroutine, so a start can begin in the admitter's call;
        `hold`: with the next descriptor to it in this step, `DataplaneLink.hold`); the time
        it was asked."""
        ...

    def specialise_with(
        self, inst: Instance, spec: FunctionSpec, request: Descriptor
    ) -> tuple[float, list[Descriptor]]:
        """`specialise`, its spec sent with `request` (to `inst`) in one message at once
        (`DataplaneLink.send_pair`): the time it was asked and the descriptors the data plane
        could not route (their errors are the caller's to dispatch once its call is booked)."""
        ...

    async def stop(self, inst: Instance, grace: float) -> None:
        """Ask it to finish and exit; kill it after `grace` seconds."""
        ...

    def kill(self, inst: Instance) -> bool: ...

    def start(self) -> None:
        """Get ready to start instances (in the background: never delays the agent)."""
        ...

    def prepare(self, spec: FunctionSpec) -> None:
        """`spec` was deployed: prepare what its first cold start needs (in the background)."""
        ...

    def forget(self, function: str) -> None:
        """`function` is no longer served: drop what the runner waits for on its behalf."""
        ...

    def status(self) -> dict[str, Any]:
        """What the runner keeps ready (zygotes), for /v1/status."""
        ...

    def fork_now(self, spec: FunctionSpec) -> tuple[bool, dict[str, Any]] | None:
        """`fork_preloaded`'s answer when it needs no wait, else None."""
        ...

    async def fork_preloaded(self, spec: FunctionSpec) -> tuple[bool, dict[str, Any]]:
        """Whether a new instance of `spec` should fork from a zygote that has done work a
        generic pool instance would do itself (the built-ins' imports and warm-ups): then
        specialising a pool instance is the slower start. If that zygote is still starting,
        this waits for it while it makes progress (`agent.zygote_wait`). Also what to add to the cold-start record (how long it
        waited, and why it gave up), {} when there is nothing to say."""
        ...

    async def close(self) -> None:
        """Wait (bounded) for every watcher: ended instances have been reported."""
        ...


def boot_record(
    spec: FunctionSpec | None,
    instance_id: str,
    eid: int,
    node: str,
    pool: str,
    proxy_socket: str,
) -> dict[str, Any]:
    """What an instance needs to know at start (HEARTH_INSTANCE). It runs function code, so it
    holds no platform credential (no Redis URL, no token): instances reach nothing but the
    data plane."""
    return {
        "instance_id": instance_id,
        "endpoint_id": eid,
        "agent_id": AGENT_ID,
        "node": node,
        "pool": pool,
        "proxy_socket": proxy_socket,
        "spec": instance_spec(spec) if spec else None,
    }


def instance_spec(spec: FunctionSpec) -> dict[str, Any]:
    """What an instance is given of its spec: the fields its runtime reads (`RunSpec`), from
    `spec.for_instance()` (never the invoke token). The whole spec is 3-4x the bytes and took
    ~40 us more to unpack in a freshly specialised pool instance."""
    full = spec.for_instance()
    return {k: full[k] for k in RunSpec._fields}


def new_instance_id(spec: FunctionSpec | None) -> str:
    return f"{(spec.name if spec else 'pool')}-{uuid.uuid4().hex[:8]}"


class ProcessRunner:
    """Each instance a new interpreter: ``python -m hearth.runtime.instance``."""

    kind = "process"

    def __init__(
        self,
        link: DataplaneLink,
        *,
        pool_name: str,
        proxy_socket: str,
        log_dir: Path | None,
        on_started: Callable[[Instance], None],
        on_exit: ExitHook,
    ) -> None:
        self.link = link
        self.pool_name = pool_name
        self.proxy_socket = proxy_socket
        self.log_dir = log_dir
        self.on_started = on_started  # before the process can report: the table knows it
        self.on_exit = on_exit
        self._eids = itertools.count(AGENT_ID + 1)
        self._watchers: set[asyncio.Task] = set()  # one per instance process: reaps its exit
        # function -> (its deployed spec, what an instance is given of it): made once per deploy
        self._instance_specs: dict[str, tuple[FunctionSpec, dict[str, Any]]] = {}

    def _new(
        self,
        spec: FunctionSpec | None,
        node: str,
        instance_id: str | None,
        kind: type[Any] = ProcessInstance,
        eid: int | None = None,
        **extra: Any,
    ) -> Any:
        """A new instance record of `kind` (not started yet), with a fresh endpoint id unless
        given one (registered ahead)."""
        return kind(
            id=instance_id or new_instance_id(spec),
            eid=next(self._eids) if eid is None else eid,
            function=spec.name if spec else None,
            ready=asyncio.get_running_loop().create_future(),
            node=node,
            runtime=POOL_RUNTIME,
            memory_mb=spec.resources.memory_mb if spec else 128,
            cpu_millicores=spec.resources.cpu_millicores if spec else 100,
            **extra,
        )

    def _log_file(self, instance_id: str) -> Any:
        if self.log_dir is None:
            return asyncio.subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return open(self.log_dir / f"{instance_id}.log", "ab")  # noqa: SIM115 - handed to the child

    async def spawn(
        self, spec: FunctionSpec | None, node: str, instance_id: str | None = None
    ) -> tuple[Instance, float]:
        inst = self._new(spec, node, instance_id)
        boot = boot_record(spec, inst.id, inst.eid, node, self.pool_name, self.proxy_socket)
        env = instance_env(spec.env if spec else None, boot)
        out = self._log_file(inst.id)
        self.on_started(inst)
        spawned = time.time()
        try:
            inst.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the agent's working directory first on the function's sys.path
                "-m",
                "hearth.runtime.instance",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=pdeathsig,
            )
        finally:
            if out is not asyncio.subprocess.DEVNULL:
                out.close()
        inst.note_start(inst.proc.pid)
        self.watch(inst)
        return inst, spawned

    def watch(self, inst: Instance) -> None:
        self._watchers.add(t := asyncio.create_task(self._watch(inst)))
        t.add_done_callback(self._watchers.discard)

    async def _watch(self, inst: Instance) -> None:
        rc = await inst.exited()
        await self.on_exit(inst, rc)

    def specialise(self, inst: Instance, spec: FunctionSpec, hold: bool = False) -> float:
        d, asked = self._spec(inst, spec)
        self._sending(inst, d, lambda: (self.link.hold if hold else self.link.post)(d))
        return asked

    def specialise_with(
        self, inst: Instance, spec: FunctionSpec, request: Descriptor
    ) -> tuple[float, list[Descriptor]]:
        d, asked = self._spec(inst, spec)
        try:  # (`_sending`'s, spelled out: no lambda and call on every pool start's path, #19)
            return asked, self.link.send_pair(d, request)
        except BaseException:
            inst.spec_slot = None
            self.link.pool.release_if_owner(d.slot, d.gen)
            raise

    def _spec(self, inst: Instance, spec: FunctionSpec) -> tuple[Descriptor, float]:
        """The spec's slot written, held as `inst.spec_slot`; its descriptor and the time."""
        slot, mlen, blen = write_slot(self.link.pool, {"spec": self._instance_spec(spec)}, b"")
        inst.spec_slot = (slot.index, slot.gen)  # freed by the agent: `Starts.spec_read`
        d = slot.descriptor(inst.eid, AGENT_ID, length=blen, meta_len=mlen, flags=SPEC_FLAGS)
        return d, time.time()

    def _sending(self, inst: Instance, d: Descriptor, send: Callable[[], Any]) -> Any:
        try:
            return send()
        except BaseException:
            # not sent: the instance is still a free pool instance, and the slot the agent's,
            # which `reclaim_dead` never frees (its next spec would overwrite `spec_slot`)
            inst.spec_slot = None
            self.link.pool.release_if_owner(d.slot, d.gen)
            raise

    def _instance_spec(self, spec: FunctionSpec) -> dict[str, Any]:
        """`instance_spec(spec)`, made once per deployed spec (`prepare`): pydantic's dump took
        ~50 us of a warm-pool start's ~2 ms. Keyed by the spec object (a redeploy brings a new
        one; deployed specs are never changed in place)."""
        got = self._instance_specs.get(spec.name)
        if got is None or got[0] is not spec:
            got = self._instance_specs[spec.name] = (spec, instance_spec(spec))
        return got[1]

    def kill(self, inst: Instance) -> bool:
        return inst.kill()

    def start(self) -> None:
        pass

    def prepare(self, spec: FunctionSpec) -> None:
        self._instance_spec(spec)  # made now, off its first start's path

    def forget(self, function: str) -> None:
        self._instance_specs.pop(function, None)  # its starts are their own tasks: nothing waits

    def fork_now(self, spec: FunctionSpec) -> tuple[bool, dict[str, Any]] | None:
        return False, {}  # no zygotes: a pool instance is always the quicker start

    async def fork_preloaded(self, spec: FunctionSpec) -> tuple[bool, dict[str, Any]]:
        return False, {}

    def status(self) -> dict[str, Any]:
        return {}

    async def stop(self, inst: Instance, grace: float) -> None:
        if not inst.running:
            return
        try:
            await self.link.shutdown(inst)
            await asyncio.wait_for(inst.exited(), grace)
        except Exception:
            inst.kill()
            await inst.exited()

    async def close(self) -> None:
        if self._watchers:
            await asyncio.wait(list(self._watchers), timeout=10)
        for t in list(self._watchers):
            t.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
