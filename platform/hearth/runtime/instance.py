"""A function instance: one OS process that loads a handler once (cold start) and serves many
invocations (warm), reading 64-byte descriptors from its data-plane endpoint and payloads from
shared-memory slots.

Started by the node agent as ``python -m hearth.runtime.instance`` with its boot record (JSON) in
the ``HEARTH_INSTANCE`` environment variable. Without a ``spec`` in the boot record it is a generic
warm-pool instance: interpreter up and common dependencies imported, waiting to be specialised.

Lean on purpose (issue #19): importing this module imports the standard library's threading,
sockets and msgpack, nothing more -- no numpy (imported when a handler asks for arrays, or
preloaded by the zygote from the spec's ``preload``), no pydantic (the agent validated the spec;
:class:`RunSpec` reads the fields the runtime needs), no asyncio (only for async handlers).
``tests/platform/test_runtime_import.py`` holds it to that.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # first thing: the 'process started' phase timestamp

import collections  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from hearth.dataplane.descriptor import FORMAT, PROXY_ID, Descriptor, Flags, Kind  # noqa: E402
from hearth.dataplane.endpoint import Endpoint  # noqa: E402
from hearth.dataplane.shm import SlotPool  # noqa: E402
from hearth.records import Record  # noqa: E402
from hearth.runtime import loading  # noqa: E402
from hearth.runtime.calls import Calls  # noqa: E402
from hearth.runtime.handling import (  # noqa: E402
    Handling,
    _awaitable,
    _coroutine_function,
)
from hearth.runtime.loading import load_entry, load_module  # noqa: E402
from hearth.runtime.replies import (  # noqa: E402
    REPLY_BATCH,
    REPLY_WAIT_S,
    _print_exc,
    write_slot,
)

# Not imported here (issue #19: every plain-process start pays for this module's imports):
# typing, dataclasses (it imports inspect), concurrent.futures (with logging) and traceback.
# The worker pool and error printing import theirs when first needed; the zygote preloads them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor
    from typing import Any

__all__ = [
    "SHUTDOWN",
    "Instance",
    "RunSpec",
    "load_entry",
    "load_module",
    "run_instance",
    "write_slot",
]

SHUTDOWN = 1  # CANCEL flag: finish in-flight work and exit
# Sync handlers whose calls average under this run on the reader thread when nothing else is in
# flight: no hand-off to a worker thread (a wake-up and a GIL transfer per call). Longer or
# chaining handlers go to the worker pool, which is what bounds concurrency.
INLINE_MAX_S = 0.002
# What a generic warm-pool instance imports before it knows its function: the common
# dependencies only. Never function code, not even the platform's example functions: they are
# the cold-start benchmark's reference handlers, and a pool that held them would measure a start
# no user's function gets (and a pool instance must hold no function's code before it is
# specialised: isolation).
POOL_PRELOAD = ("asyncio", "numpy")
_unpack = struct.Struct(FORMAT).unpack  # the serve loop's descriptor decode
_SPEC = int(Flags.SPEC)
_SPEC_REPORT = int(Flags.SPEC | Flags.SPEC_REPORT)  # both bits set: see handle_specialise


def _decode(frame: bytes) -> Descriptor:
    """``Descriptor.unpack`` of a received 64-byte frame without making ``kind`` a `Kind`
    (an enum lookup, ~0.5 us a call): it stays the int it compares equal to."""
    return Descriptor(*_unpack(frame))


class RunSpec(Record):
    """What an instance needs of its function's spec. The agent validated the spec
    (``hearth.spec.FunctionSpec``) and sends ``FunctionSpec.to_dict()``; this reads that dict,
    so the runtime never imports pydantic."""

    _fields = ("name", "handler", "init", "code_path", "env", "concurrency", "timeout_s")

    def __init__(
        self,
        name: str,
        handler: str,
        init: str | None = None,
        code_path: str | None = None,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        timeout_s: float = 30.0,
    ) -> None:
        self.name = name
        self.handler = handler
        self.init = init
        self.code_path = code_path
        self.env = {} if env is None else env
        self.concurrency = concurrency
        self.timeout_s = timeout_s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(
            name=d["name"],
            handler=d["handler"],
            init=d["init"],
            code_path=d["code_path"],
            env=dict(d["env"]),
            concurrency=int(d["concurrency"]),
            timeout_s=float(d["timeout_s"]),
        )


class Instance(Handling, Calls):
    """One function instance: its endpoint, slot pool and handler, and the serve loop that
    reads descriptors and dispatches them. Replies and reports (`replies.Wire`), running the
    handler (`handling.Handling`) and chained calls (`calls.Calls`) are its mixins."""

    def __init__(self, boot: dict[str, Any], started: float | None = None):
        self.boot = boot
        self.instance_id: str = boot["instance_id"]
        self.eid: int = boot["endpoint_id"]
        self.agent: int = boot["agent_id"]
        self.node: str = boot.get("node", "local")
        # a forked instance (the zygote) started at its fork, not at this module's import
        self.phases: dict[str, float] = {"process_started": started or T_PROCESS}
        self.pool = SlotPool.attach(boot["pool"])
        pre = boot.get("endpoint_fds")  # registered ahead by the agent (zygote forks)
        self.ep = (
            Endpoint.from_fds(boot["proxy_socket"], self.eid, *pre, boot["endpoint_mode"])
            if pre
            else Endpoint.register(boot["proxy_socket"], self.eid)
        )
        self.send_lock = threading.Lock()
        self.waiters: dict[bytes, Future] = {}
        self.spec: RunSpec | None = None
        self.handler: Any = None
        self.is_async = False
        self.loop: Any = None  # an asyncio loop, for async handlers only
        self.executor: ThreadPoolExecutor | None = None  # made by the first call it runs
        self.serving = False
        self.stopping = False
        self.failed = False  # a pool instance whose specialisation failed: runs no request
        # ctx.alloc() buffers by payload address: they live as long as this instance
        self.allocs: dict[int, tuple[Any, int]] = {}
        self.reader = threading.current_thread()
        self.inline_ok = True  # turned off for good once a handler chains from the reader thread
        self.avg_s = 1.0  # moving average of handler time; pessimistic until measured
        self.pooled_busy = 0
        self.busy_lock = threading.Lock()
        self.stash: collections.deque[Descriptor] = collections.deque()
        # replies of inline calls while more requests are already received: sent together
        # (one sendmsg, one wake-up of the agent) before the reader next blocks
        self.outq: list[tuple[int, bytes]] = []
        self.outq_t0 = 0.0  # when the oldest queued reply was made (bounds the added latency)

    def specialise(self, spec: RunSpec) -> None:
        self.spec = spec
        if spec.code_path and spec.code_path not in sys.path:
            sys.path.insert(0, spec.code_path)
        if spec.env:  # (an empty update still runs the Mapping ABC check)
            os.environ.update(spec.env)
        self.phases["code_import_start"] = time.time()
        self.handler = load_entry(spec.handler, spec.code_path)
        self.phases["code_imported"] = time.time()
        if spec.init:
            init = load_entry(spec.init, spec.code_path)
            r = init()
            if _awaitable(r):
                import asyncio

                asyncio.run(r)
        self.phases["deps_ready"] = time.time()
        self.is_async = _coroutine_function(self.handler)
        if self.is_async:
            import asyncio

            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="handler-loop", daemon=True).start()
        self.serving = True  # from here SIGTERM drains instead of exiting at once
        # one call at a time anyway: the first runs on the reader thread (no worker thread to
        # start on the cold path, ~1 ms); its time then decides, as for every later call
        self.avg_s = 0.0 if spec.concurrency == 1 else 1.0
        self.phases["ready"] = time.time()

    def run(self) -> int:
        spec = self.boot.get("spec")
        if spec is None:
            # Warm pool: pay for the interpreter and common imports now, specialise later
            # (a pooled instance does not know its function's preload yet: these are the
            # usual ones; the lean import above stays for forks of a preloaded zygote)
            for mod in POOL_PRELOAD:
                importlib.import_module(mod)
            self.phases["pool_ready"] = time.time()
            self.report("pooled", phases=self.phases)
        else:
            self.specialise(RunSpec.from_dict(spec))
            self.report("ready", phases=self.phases)
        return self.serve()

    def serve(self) -> int:
        while not self.stopping:
            try:
                if self.outq and (
                    (not self.stash and not self.ep.buffered())  # next read would block
                    or len(self.outq) >= REPLY_BATCH
                    or time.perf_counter() - self.outq_t0 > REPLY_WAIT_S
                ):
                    self.flush_replies()
                d = self.stash.popleft() if self.stash else _decode(self.ep.recv_frame())
            except (ConnectionError, OSError) as e:
                print(f"instance {self.instance_id}: data plane closed: {e}", file=sys.stderr)
                return 1
            if d.src not in (self.agent, PROXY_ID):
                # work, replies and shutdowns come from the agent only (the proxy stamps `src`
                # with the sender's registered id); another instance's descriptor is dropped
                # untouched: its slot is not ours to read or free
                continue
            if d.kind == Kind.INVOKE:
                if self.spec is None:
                    self.handle_specialise(d)
                elif self.failed:
                    continue  # (see handle_specialise)
                elif (
                    self.inline_ok
                    and not self.is_async
                    and self.pooled_busy == 0
                    and self.avg_s < INLINE_MAX_S
                ):
                    self.timed_handle(d)
                else:
                    with self.busy_lock:
                        self.pooled_busy += 1
                    (self.executor or self._workers()).submit(self.pooled_handle, d)
            elif d.kind in (Kind.REPLY, Kind.ERROR):
                fut = self.waiters.pop(bytes(d.corr), None)
                if fut is not None:
                    fut.set_result(d)
                elif d.has_slot:
                    self._release(d)
            elif d.kind == Kind.PING:
                self.send(d.reply(kind=Kind.PONG))
            elif d.kind == Kind.CANCEL and d.flags & SHUTDOWN:
                self.stopping = True
        if self.executor:
            self.executor.shutdown(wait=True)  # never kill work in the middle of an invocation
        self.flush_replies()
        return 0

    def handle_specialise(self, d: Descriptor) -> None:
        """A pool instance's first message is its spec, in a slot the agent wrote for it. Marked
        `Flags.SPEC`, the agent frees that slot once this instance reports it read
        (`spec_read`) or ends: read here, not released, so no pool lock is taken before the
        import (#19). Not marked, it comes from an agent of an earlier build, which may never
        free it (before 7 Dec 2026 the instance did): freed here once read, before the import
        as then (an agent that frees it at `spec_read` finds it freed: its generation moved on).
        Anything else (a request that overtook its spec) is reported as such, without
        `spec_read` (the spec, still on its way, is not read: the agent frees it at this
        instance's exit), and its slot left alone: it may be a caller's, lent to this call
        (BORROWED), not ours to free."""
        try:
            meta = self._meta(d)
        except Exception as e:  # (a stale or unreadable slot: not the agent's spec)
            meta = {"error": f"{type(e).__name__}: {e}"}
        if not isinstance(meta.get("spec"), dict):
            self.report(
                "failed",
                error=f"pool instance: its first message (kind {Kind(d.kind).name}, corr "
                f"{bytes(d.corr).hex()}) carried no spec: the spec must come first",
                phases=self.phases,
            )
            return
        if not d.flags & _SPEC:
            self._release(d)  # an earlier agent's: ours to free, read already (see above)
        try:
            self.specialise(RunSpec.from_dict(meta["spec"]))
            # the spec's slot carries the report where the agent says it takes it there (it
            # frees the slot at `spec_read`); an agent that only marks SPEC would drop it
            marked = d if d.flags & _SPEC_REPORT == _SPEC_REPORT else None
            self.report("ready", marked, phases=self.phases, from_pool=True, spec_read=True)
        except Exception as e:  # the agent stops this instance and reports the error
            error = f"{type(e).__name__}: {e}"
            self.report("failed", error=error, phases=self.phases, spec_read=True)
            # and runs no request until the agent stops it: one sent ahead of this report
            # (with the spec, #19) would run without a handler and answer 500, where its
            # caller gets 502 `cold_start_failed` when the agent stops this instance (its
            # slot is the agent's, freed then)
            self.failed = True


def run_instance(boot: dict[str, Any], started: float | None = None, leave: Any = None) -> int:
    """Serve as the instance `boot` describes until told to stop; the exit code. `leave`
    replaces the SIGTERM behaviour (a joined pod asks its node agent to drain it instead)."""
    inst: Instance | None = None

    def on_term(*_: Any) -> None:
        if leave is not None:
            leave()
            return
        if inst is None or not inst.serving:
            os._exit(0)
        inst.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    loading.install()  # (done already in a zygote's fork)
    inst = Instance(boot, started)
    try:
        return inst.run()
    except Exception as e:
        # A cold start that fails (import error, init raising) is reported to the agent.
        _print_exc()
        try:
            inst.report("failed", error=f"{type(e).__name__}: {e}", phases=inst.phases)
        except Exception:
            pass
        return 1


def main() -> int:
    # The boot record is for the runtime, not the handler: gone before any user code loads.
    return run_instance(json.loads(os.environ.pop("HEARTH_INSTANCE")))


if __name__ == "__main__":
    sys.exit(main())
