"""Instances that join the node agent instead of being spawned by it: Kubernetes pods.

On Kubernetes the controller decides how many instances run and where; each is a pod pinned to
its node that mounts the node's socket directory and slot pool. The pod's runtime
(`python -m hearth.runtime.pod`) connects to the agent's join socket (`join.sock` beside the
proxy socket) and sends one JSON line: `{"instance_id", "function", "owner"}` (function null
for a generic warm-pool pod; owner: its process's pid and start time in its own pid namespace,
as its slots name it, so they are kept while it is joined; checked against the connection,
`hearth.agent.peer`). At most `max_joined` join connections are open at once
(`HEARTH_MAX_JOINED`, 256): each may keep an owner's slots, and holds a file descriptor. The
agent gives it a data-plane endpoint id and answers with the same boot record a spawned process
gets; the runtime registers with the proxy and reports ready
over the data plane like any instance, and from then on the agent routes to it as to a local
process (`Ready = registered`: the agent sends `{"registered": true}` on the join connection
once the instance is in its table, and the pod's readiness probe checks the file the runtime
writes then). The join connection is the instance's life line: when the pod's end closes, the
instance is gone; when the agent wants it gone (keep-alive, shutdown), it stops it over the data
plane, or kills it by closing its own end for writing (`JoinedInstance.kill`): the runtime
exits at that EOF, and its end closes once its process has ended.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from hearth.agent.instance import _Held
from hearth.agent.peer import check_claim
from hearth.agent.runner import ProcessRunner, boot_record, instance_spec
from hearth.runtime.pod import JOIN_SOCKET  # noqa: F401 - re-exported for the agent side
from hearth.spec import NAME_RE

log = logging.getLogger("hearth.agent.join")

MAX_LINE = 4096
# Joined instances take endpoint ids from their own range, clear of the ones ProcessRunner
# counts up from 2 (the descriptor's dst is 32 bits).
JOIN_EID_BASE = 1 << 24
# join connections open at once, by default (HEARTH_MAX_JOINED): above a node's pod limit
# (Kubernetes' default is 110 pods a node)
MAX_JOINED = 256
# how long a killed pod has to close its end of the join connection (its runtime exits at the
# EOF the kill sends, `JoinedInstance.kill`) before the agent closes it and counts it gone
KILL_GRACE_S = 5.0


@dataclass
class JoinedInstance(_Held):
    """An instance that runs outside this agent (a pod) and joined over the join socket."""

    writer: asyncio.StreamWriter | None = None
    gone: asyncio.Future | None = None
    # the slot owner its process is (pid, start time in its own pid namespace; checked against
    # the connection where the agent can see the process, `hearth.agent.peer`): its slots live
    # while the join connection is open (`SlotPool.reclaim_dead`); never used to grant access
    claims: tuple[int, int] | None = None
    # a kill's deadline for the pod to close its end (`kill`): None until killed
    cut: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return None  # in another pid namespace

    @property
    def running(self) -> bool:
        return self.gone is not None and not self.gone.done()

    @property
    def ending(self) -> bool:
        """Killed, its end not closed yet (`kill` set the deadline to cut it off)."""
        return self.cut is not None

    def kill(self) -> bool:
        """End the life line from the agent's side, for writing only (EOF): the pod's runtime
        exits as it reads it (`hearth.runtime.pod._life_line`), and its end of the connection
        closes when its process has ended (the kernel closes a process's files after its
        memory is gone), which is the EOF `JoinServer._watch` waits for. So what the agent
        frees at the instance's exit (the spec slot it was sent, a request slot, its own
        slots: `Lifecycle.exited`) is freed only once nothing of the pod can write it. Closing
        the connection outright (before 7 Dec 2026) freed them at once, while the pod, in its
        import, could still write its report into a spec slot reused meanwhile. A pod that
        has not closed within KILL_GRACE_S (stopped, hung) is cut off and counted gone: then
        the slot generation check is what stands (docs/dataplane.md)."""
        if not self.running or self.cut is not None:
            return False
        assert self.writer is not None
        try:
            self.writer.write_eof()
        except (OSError, RuntimeError):  # (its end went already)
            self.writer.close()
            return True
        self.cut = asyncio.get_running_loop().call_later(KILL_GRACE_S, self.writer.close)
        return True

    async def exited(self) -> int:
        """(shielded: a stop's bounded wait, `ProcessRunner.stop`, cancelled `gone` at its end
        before 7 Dec 2026, so its kill found the pod not running and never cut it off)"""
        assert self.gone is not None
        return await asyncio.shield(self.gone)


class JoinServer:
    """The agent's join socket (AF_UNIX, owner-only like the proxy socket)."""

    def __init__(
        self,
        agent: Any,
        path: str,
        max_joined: int = MAX_JOINED,
        bound_by: str = "HEARTH_MAX_JOINED",
    ) -> None:
        self.agent = agent
        self.path = path
        self.max_joined = max_joined
        self.bound_by = bound_by  # what set `max_joined`, named when a join is refused
        self.connections = 0  # join connections open now (joined or joining)
        self._eids = itertools.count(JOIN_EID_BASE)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.joined = 0
        # function (None: pool) -> starts waiting for the next pod of it (JoinRunner.spawn)
        self.expected: dict[str | None, list[asyncio.Future]] = {}

    def expect(self, function: str | None) -> asyncio.Future:
        """A future resolved with the next instance of `function` that joins."""
        fut = asyncio.get_running_loop().create_future()
        self.expected.setdefault(function, []).append(fut)
        return fut

    def _waiter(self, function: str | None) -> asyncio.Future | None:
        waiting = self.expected.get(function) or []
        while waiting:
            fut = waiting.pop(0)
            if not fut.done():
                return fut
        return None

    async def start(self) -> JoinServer:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of an earlier run
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, self.path)
        finally:
            os.umask(old)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = asyncio.current_task()
        assert t is not None
        self._tasks.add(t)
        self.connections += 1
        try:
            if self.connections > self.max_joined:
                await self._refuse(writer, "join_limit", self._full())
            else:
                await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            self._tasks.discard(t)
            writer.close()

    def _full(self) -> str:
        return (
            f"this node agent has {self.max_joined} join connections open, as many as it "
            f"allows ({self.bound_by})"
        )

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, error: str, detail: str) -> None:
        writer.write(json.dumps({"error": error, "detail": detail}).encode() + b"\n")
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            req = json.loads(line[:MAX_LINE]) if line else None
            inst, spec = self._admit(req, writer.get_extra_info("socket"))
        except (TimeoutError, ValueError, TypeError) as e:
            await self._refuse(writer, "bad_join", str(e))
            return
        a = self.agent
        loop = asyncio.get_running_loop()
        inst.writer, inst.gone, inst.ready = writer, loop.create_future(), loop.create_future()
        a.table.started(inst)
        pooled = spec is None
        # a start the agent is waiting for (JoinRunner.spawn) takes it: the lifecycle then
        # adopts it when it reports ready, exactly as a spawned process
        waiter = self._waiter(inst.function)
        if pooled and waiter is None:
            a.table.add_pooled(inst)
        boot = boot_record(spec, inst.id, inst.eid, inst.node, a.pool.name, a.proxy_socket)
        writer.write(json.dumps(boot).encode() + b"\n")
        await writer.drain()
        if waiter is not None:
            waiter.set_result(inst)
        watcher = loop.create_task(self._watch(inst, reader))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)
        requested = inst.started_at
        try:
            phases = await asyncio.wait_for(asyncio.shield(inst.ready), 120)
        except Exception as e:
            log.warning("joined instance %s did not become ready: %s", inst.id, e)
            if pooled and waiter is None:
                a.table.drop_pooled(inst)
            inst.kill()
            await watcher  # its end closed (or cut off): then the connection is closed
            return
        if waiter is not None:
            pass  # the lifecycle's start adopts it
        elif pooled:
            a.table.pooled_ready(inst, phases)
        else:
            a.table.ready(inst, spec.keep_alive.ttl_s)
            fs = a.table.adopt(a.lifecycle.serve(spec), inst)
            a.coldstarts.record(spec, inst, requested, requested, phases, fs)
            a.admitter.wake(fs, spec.concurrency)
        self.joined += 1
        writer.write(b'{"registered": true}\n')
        await writer.drain()
        await watcher

    def _admit(self, req: Any, sock: Any) -> tuple[JoinedInstance, Any]:
        import re

        if not isinstance(req, dict):
            raise ValueError("expected one JSON object line")
        iid = req.get("instance_id")
        if not isinstance(iid, str) or not re.match(NAME_RE, iid):
            raise ValueError("instance_id: a DNS-1123 label")
        if self.agent.table.find(iid) is not None or iid in self.agent.table.pooled:
            raise ValueError(f"instance_id {iid!r} already joined")
        owner = req.get("owner")
        if owner is not None and not (
            isinstance(owner, list)
            and len(owner) == 2
            and all(type(v) is int for v in owner)
            and 0 < owner[0] < 1 << 32
            and 0 <= owner[1] < 1 << 64
        ):
            raise ValueError("owner: [pid, start time], a pid and a clock-tick count")
        if owner is not None and (why := check_claim((owner[0], owner[1]), sock)) is not None:
            raise ValueError(why)
        fn = req.get("function")
        spec = None
        if fn is not None:
            fs = self.agent.table.get(fn) if isinstance(fn, str) else None
            if fs is None:
                raise ValueError(f"function {fn!r} is not deployed on this node")
            spec = fs.spec
        inst = JoinedInstance(
            id=iid,
            eid=next(self._eids),
            function=spec.name if spec else None,
            node=self.agent.node,
            memory_mb=spec.resources.memory_mb if spec else 128,
            cpu_millicores=spec.resources.cpu_millicores if spec else 100,
            claims=(owner[0], owner[1]) if owner is not None else None,
        )
        return inst, spec

    async def _watch(self, inst: JoinedInstance, reader: asyncio.StreamReader) -> None:
        """The life line: `{"leave": true}` (the pod got SIGTERM) drains the instance -- no new
        invocations, in-flight ones finish, then the data plane tells it to exit; EOF (the pod
        ended, or kill() closed it) means the instance is gone."""
        leaving: asyncio.Task | None = None
        try:
            while line := await reader.readline():
                try:
                    leave = json.loads(line).get("leave") is True
                except (ValueError, AttributeError):
                    leave = False
                if leave and leaving is None:
                    self.agent.table.stopping(inst)
                    leaving = asyncio.create_task(self.agent.lifecycle.drain_and_stop(inst))
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            # EOF, a broken line, or the join server's close (`close`, before the agent's at a
            # node's stop: the connection closes with it, the pod exits at that EOF): the pod is
            # gone. Nothing else ends `gone`: a stop of the pod waited for it, its grace and
            # then without end
            if inst.cut is not None:
                inst.cut.cancel()
            if inst.gone is not None and not inst.gone.done():
                inst.gone.set_result(0)
        self.agent.table.drop_pooled(inst)
        await self.agent.lifecycle.exited(inst, 0)
        if leaving is not None:
            await asyncio.gather(leaving, return_exceptions=True)


class JoinRunner:
    """The runner of a node agent whose instances are pods (HEARTH_INSTANCES=pods): it starts
    nothing. A start waits for the next pod of the function to join on this node -- the
    controller creates pods from the load the agents publish, so a request held at zero is
    what makes one appear (Knative's activator) -- and fails with a clear 503 after
    `timeout_s`. Specialising, stopping and killing go over the data plane and the join
    connection."""

    def __init__(self, link: Any, joins: JoinServer, timeout_s: float = 60.0) -> None:
        self.link = link
        self.joins = joins
        self.timeout_s = timeout_s

    async def spawn(
        self, spec: Any, node: str, instance_id: str | None = None
    ) -> tuple[JoinedInstance, float]:
        from hearth.invoke import InvokeError

        fn = spec.name if spec is not None else None
        fut = self.joins.expect(fn)
        try:
            inst = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise InvokeError(
                503,
                "no_instance",
                f"no instance pod of {fn or 'the warm pool'!r} joined this node within "
                f"{self.timeout_s:g}s (see `kubectl describe function {fn}`)",
            ) from None
        return inst, time.time()

    # over the data plane, as for a process (they use only `self.link` and the spec's fields)
    specialise = ProcessRunner.specialise
    specialise_with = ProcessRunner.specialise_with
    _spec = ProcessRunner._spec
    _sending = ProcessRunner._sending
    _instance_spec = staticmethod(instance_spec)  # a pod is specialised once: nothing to keep
    stop = ProcessRunner.stop

    kind = "pods"

    def kill(self, inst: Any) -> bool:
        return inst.kill()

    def forget(self, function: str) -> None:
        """`function` is no longer served: its starts stop waiting for a pod now (they would
        otherwise wait out `timeout_s` and could take a pod of a later deployment)."""
        from hearth.invoke import UnknownFunction

        for fut in self.joins.expected.pop(function, []):
            if not fut.done():
                fut.set_exception(UnknownFunction(function))

    def start(self) -> None:
        return None  # nothing to keep ready: the controller makes the pods

    def prepare(self, spec: Any) -> None:
        return None

    def fork_now(self, spec: Any) -> tuple[bool, dict[str, Any]] | None:
        return False, {}  # pods join: nothing forks here

    async def fork_preloaded(self, spec: Any) -> tuple[bool, dict[str, Any]]:
        return False, {}

    def status(self) -> dict[str, Any]:
        return {
            "joined": self.joins.joined,
            "waiting": sum(len(v) for v in self.joins.expected.values()),
        }

    async def close(self) -> None:
        return None
