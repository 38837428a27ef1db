"""The zygote runner: new instances are forked from a per-node fork server that has the runtime
and the common dependencies imported already (hearth.runtime.zygote), instead of starting an
interpreter and importing everything again.

Zygotes per node: the runtime's (hearth's runtime and msgpack, plus the node's
HEARTH_ZYGOTE_PRELOAD), started with the agent; the built-ins' (adds the built-in functions'
handler modules, numpy and their numba kernels), started when the first built-in function is
deployed; and one per distinct ``preload`` list of the deployed specs (e.g. ``[numpy]``), started
when such a function is deployed, so its instances fork with those modules imported. Which zygote
serves a spec is `zygote_plan`'s decision (pure); at most `MAX_ZYGOTES`, past that a spec's
instances fork from the runtime's zygote and import their modules themselves (logged). A start
of a built-in waits for the built-ins' zygote while it comes up and works (`zygote_wait`), and so
does a start with no pool instance to take, whichever zygote it forks from. If a zygote cannot
start, instances start as plain processes (ProcessRunner) and a warning says so, and it is not
started again for `retry_s`. A ready zygote that does not answer a fork within `fork_timeout_s`
fails that start only (a plain process instead) and forks no more; its instances keep running,
and once none is left it is stopped and replaced (`retire`). Isolation is the zygote's (see
hearth.runtime.zygote): allow-listed environment, fresh descriptors and sockets, no inherited
threads, death with the agent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hearth.agent.instance import POOL_RUNTIME, ForkedInstance, Instance
from hearth.agent.runner import ProcessRunner, boot_record
from hearth.agent.zygote_server import Zygote, ZygoteError
from hearth.agent.zygote_wait import (
    FORK_TIMEOUT_S,
    POLL_S,
    ZYGOTE_RETRY_S,
    ZYGOTE_WAIT_MAX_S,
    ZYGOTE_WAIT_S,
    ZygoteProgress,
    zygote_wait,
)
from hearth.dataplane.endpoint import open_registration
from hearth.runtime.zygote import instance_env as zygote_child_env
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.node")

BUILTINS = "hearth.functions."
# built-in handler modules that are worth pre-importing (seconds of numba and numpy code)
BUILTIN_PRELOAD = (
    "hearth.functions.fedavg.handlers:init",  # its init loads the numba fold kernels
    "hearth.functions.vecsearch.handlers",
)
BUILTINS_KEY = "builtins"
# endpoints registered with the proxy ahead of the next cold starts (the registration round
# trip, 2-40 ms from a freshly forked child on a busy node, leaves the request path)
ENDPOINT_STOCK = 2
MAX_ZYGOTES = 8  # each holds an interpreter and its modules (tens of MB, shared with its forks)


def zygote_plan(spec: FunctionSpec | None) -> tuple[str, tuple[str, ...], str | None]:
    """Which zygote forks `spec`'s instances: (key, the modules it imports beyond the node's
    runtime zygote, the directory it puts on sys.path). Same key, same zygote: a spec's own
    ``preload`` (and its code directory, where its modules may live) is part of the key, so a
    zygote only ever holds what the functions forking from it declared."""
    if spec is None:
        return POOL_RUNTIME, (), None
    extra: list[str] = []
    builtin = False
    if spec.handler.startswith(BUILTINS) and not spec.code_path:
        mod = spec.handler.partition(":")[0]
        builtin = any(p.partition(":")[0] == mod for p in BUILTIN_PRELOAD)
        if builtin:
            extra.extend(BUILTIN_PRELOAD)
    own = sorted(set(spec.preload) - {p.partition(":")[0] for p in extra})
    if not own:
        return (BUILTINS_KEY if builtin else POOL_RUNTIME), tuple(extra), None
    extra.extend(own)
    key = ("builtins+" if builtin else "preload:") + ",".join(own)
    if spec.code_path:
        key += f"@{spec.code_path}"
    return key, tuple(extra), spec.code_path


def unused_zygotes(running: dict[str, int], specs: Iterable[FunctionSpec | None]) -> set[str]:
    """The zygotes to stop, of those `running` (key -> instances forked from it that still
    run): the ones no spec in `specs` (those deployed) forks from, once none of their
    instances is left (they die with their zygote). The runtime's and the built-ins'
    zygotes stay: they are the node's own, and the built-ins' takes seconds to start again.
    Without this, every preload list ever deployed keeps its interpreter (up to MAX_ZYGOTES)."""
    needed = {zygote_plan(s)[0] for s in specs} | {POOL_RUNTIME, BUILTINS_KEY}
    return {key for key, n in running.items() if key not in needed and n == 0}


def _retrieved(t: asyncio.Task) -> None:
    if not t.cancelled():
        t.exception()  # logged where it is awaited (spawn falls back to a plain process)


class ZygoteRunner(ProcessRunner):
    """A Runner that forks instances from per-node zygotes (falls back to processes)."""

    def __init__(
        self,
        *args: Any,
        preload: list[str] | None = None,
        deployed: Callable[[], Iterable[FunctionSpec]] = list,
        wait_s: float = ZYGOTE_WAIT_S,
        wait_max_s: float = ZYGOTE_WAIT_MAX_S,
        fork_timeout_s: float = FORK_TIMEOUT_S,
        retry_s: float = ZYGOTE_RETRY_S,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.preload = list(preload or [])
        self.wait_s = wait_s  # without progress; see zygote_wait
        self.wait_max_s = wait_max_s  # in all, from the zygote's start
        self.fork_timeout_s = fork_timeout_s  # a ready zygote's answer to a fork
        self.retry_s = retry_s  # a zygote that failed (start, fork) is not started again before
        self.deployed = deployed  # the specs served now: which zygotes are still needed
        self.zygotes: dict[str, Zygote] = {}
        self._starting: dict[str, asyncio.Future] = {}
        # key -> a starting zygote (its pid) and when it last showed progress (zygote_wait)
        self._booting: dict[str, Zygote] = {}
        self._progress: dict[str, ZygoteProgress] = {}
        self._failed: dict[str, float] = {}  # key -> when its last start failed (monotonic)
        # key -> (modules beyond the node's, code directory): what each zygote is started with
        self._plans: dict[str, tuple[tuple[str, ...], str | None]] = {POOL_RUNTIME: ((), None)}
        # (endpoint id, control socket, data socket, mode) registered ahead of a cold start
        self._stock: collections.deque[tuple[int, socket.socket, socket.socket, str]] = (
            collections.deque()
        )
        self._filling: asyncio.Task | None = None
        self._closing = False
        self.kind = "zygote"

    def key_for(self, spec: FunctionSpec | None) -> str:
        key, extra, code_path = zygote_plan(spec)
        if key not in self._plans:
            if len(self._plans) >= MAX_ZYGOTES:
                log.warning(
                    "zygote %s not started: already %d zygotes on this node; %s forks from the "
                    "runtime's zygote and imports its preload itself",
                    key,
                    len(self._plans),
                    spec.name if spec else "a pool instance",
                )
                return POOL_RUNTIME
            self._plans[key] = (extra, code_path)
        return key

    def _state(self, key: str) -> str:
        z = self.zygotes.get(key)  # set once the zygote is ready
        if z is not None and not z.dead:
            return "gone" if z.hung else "ready"  # (a hung one: until its instances end)
        t = self._starting.get(key)
        return "starting" if t is not None and not t.done() else "gone"

    def _idle_s(self, key: str) -> float:
        """Seconds since the starting zygote `key` last showed progress (`ZygoteProgress`)."""
        prog = self._progress.get(key)
        if prog is None:
            return 0.0
        z = self._booting.get(key)
        pid = z.proc.pid if z is not None and z.proc is not None else None
        return prog.idle_s(pid)

    def _age_s(self, key: str) -> float:
        """Seconds since the zygote `key` was started (the cap on waits for it runs from here)."""
        prog = self._progress.get(key)
        return 0.0 if prog is None else time.monotonic() - prog.started

    def _decide(self, key: str, worth: bool) -> tuple[str, float | None]:
        """(the zygote's state, `zygote_wait`'s answer) for a start from zygote `key` now;
        `worth`: whether a start would wait for it at all (see `zygote_wait`). The cap
        (wait_max_s) counts from the zygote's start, not from this start's: a zygote that stays
        busy delays the starts of its first wait_max_s seconds only."""
        state = self._state(key)
        waiting = worth and state == "starting"  # (no /proc read for a zygote not waited for)
        idle = self._idle_s(key) if waiting else 0.0
        left = self.wait_max_s - (self._age_s(key) if waiting else 0.0)
        return state, zygote_wait(worth, state, idle, self.wait_s, left)

    def _stalled(self, key: str) -> str:
        if self.wait_s <= 0 or self.wait_max_s <= 0:
            which = "HEARTH_ZYGOTE_WAIT_S" if self.wait_s <= 0 else "HEARTH_ZYGOTE_WAIT_MAX_S"
            return f"zygote {key} still starting, and {which}=0: no wait"
        if self._age_s(key) >= self.wait_max_s:
            return (
                f"zygote {key} still starting after {self.wait_max_s:g} s "
                "(from its start: the most starts wait for it)"
            )
        return f"zygote {key} still starting, with no progress for {self.wait_s:g} s"

    def fork_now(self, spec: FunctionSpec) -> tuple[bool, dict[str, Any]] | None:
        # A user `preload` of what a pool instance already holds forks slower than the pool
        # specialises (7.9 vs 2.4 ms in `make demo`): only the built-ins' zygote (zygote_wait).
        key = zygote_plan(spec)[0]
        return self._fork_now(key, key.startswith(BUILTINS_KEY))

    def _fork_now(self, key: str, worth: bool) -> tuple[bool, dict[str, Any]] | None:
        state, wait = self._decide(key, worth)
        if wait is None:
            if state == "starting":  # stalled: starts no longer wait for it
                return False, {"zygote_fallback": self._stalled(key)}
            return False, {}
        return (True, {}) if wait == 0 else None

    async def fork_preloaded(self, spec: FunctionSpec) -> tuple[bool, dict[str, Any]]:
        key = zygote_plan(spec)[0]
        return await self._await_zygote(key, key.startswith(BUILTINS_KEY), spec.name)

    async def _await_zygote(
        self, key: str, worth: bool, name: str, instead: str = "from the warm pool"
    ) -> tuple[bool, dict[str, Any]]:
        """Whether a start of `name` forks from zygote `key`, having waited for it while it
        comes up (by `zygote_wait`'s rule if `worth`, else not at all), and the note for its
        cold-start record (how long it waited, why not)."""
        answer = self._fork_now(key, worth)
        if answer is not None:
            return answer
        # starting and working: wait while it works (the built-ins' one is ahead of a pool
        # instance that would do the same imports; with no pool instance, a fork is ahead of
        # a plain process), up to the cap (wait_max_s from its start), and not a moment after
        # it is ready
        t0 = time.monotonic()
        why = None
        while True:
            state, wait = self._decide(key, worth)
            if wait is None or wait == 0:
                break
            try:
                await asyncio.wait_for(asyncio.shield(self._starting[key]), min(POLL_S, wait))
            except TimeoutError:
                continue
            except Exception as e:  # it failed to start (logged where it is awaited)
                why = f"zygote {key} failed to start: {e}"
                break
        waited = time.monotonic() - t0
        note: dict[str, Any] = {"zygote_wait_ms": round(waited * 1000, 1)}
        if why is None and self._state(key) == "ready":
            return True, note
        if why is None:
            why = self._stalled(key) if state == "starting" else f"zygote {key} is gone"
        note["zygote_fallback"] = why
        log.warning("%s: %s starts %s", why, name, instead)
        return False, note

    def status(self) -> dict[str, Any]:
        """Each zygote's state (starting, ready, gone), pid and modules, for /v1/status."""
        out: dict[str, Any] = {}
        for key, t in self._starting.items():
            z = self.zygotes.get(key)
            if z is not None and not z.dead:
                out[key] = {
                    "state": "hung" if z.hung else "ready",
                    **({"hung": z.hung} if z.hung else {}),
                    "pid": z.info.get("pid"),
                    "preloaded": z.info.get("preloaded", []),
                    "failed": z.info.get("failed") or {},
                }
            else:
                out[key] = {"state": "starting" if not t.done() else "gone", "pid": None}
        return out

    def _preload_for(self, key: str) -> tuple[list[str], str | None]:
        extra, code_path = self._plans.get(key, ((), None))
        return [*self.preload, *extra], code_path

    def start(self) -> None:
        self._zygote_task(POOL_RUNTIME)
        self._refill()

    def _refill(self) -> None:
        if self._filling is None and not self._closing and len(self._stock) < ENDPOINT_STOCK:
            self._filling = asyncio.create_task(self._fill())
            self._filling.add_done_callback(_retrieved)

    async def _fill(self) -> None:
        try:
            while len(self._stock) < ENDPOINT_STOCK and not self._closing:
                eid = next(self._eids)
                try:
                    ctrl, data, mode = await asyncio.to_thread(
                        open_registration, self.proxy_socket, eid, 5.0
                    )
                except Exception as e:  # the child registers itself, as without the stock
                    log.debug("could not register an endpoint ahead: %s", e)
                    return
                if self._closing:
                    ctrl.close()
                    data.close()
                    return
                self._stock.append((eid, ctrl, data, mode))
        finally:
            self._filling = None

    def prepare(self, spec: FunctionSpec) -> None:
        """A function was deployed: have its zygote up before its first cold start."""
        super().prepare(spec)
        key = self.key_for(spec)
        if key not in self.zygotes or self.zygotes[key].dead:
            self._zygote_task(key)

    def forget(self, function: str) -> None:
        super().forget(function)
        self.retire()

    def retire(self) -> None:
        """Stop the zygotes `unused_zygotes` names (their functions were deleted and their
        last instance has ended); they no longer count towards MAX_ZYGOTES."""
        if self._closing:
            return
        for key, z in list(self.zygotes.items()):
            if z.hung and not z.dead and not z.running:
                self._replace(key, z)
        running = {k: z.running for k, z in self.zygotes.items() if not z.dead}
        for key in unused_zygotes(running, self.deployed()):
            z = self.zygotes.pop(key)
            self._plans.pop(key, None)
            self._starting.pop(key, None)
            self._progress.pop(key, None)
            log.info("zygote %s stopped: no deployed function forks from it", key)
            t = asyncio.create_task(z.close())
            t.add_done_callback(_retrieved)

    def _replace(self, key: str, z: Zygote) -> None:
        """Stop a hung zygote none of whose instances is left (killed: it reads its control
        socket no more); it counts as a failed start, so the next start of its functions past
        retry_s starts a new one, and those before it are plain processes."""
        assert z.hung is not None
        del self.zygotes[key]
        self._failed[key] = time.monotonic()
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(ZygoteError(z.hung))
        failed.exception()  # (retrieved: raised to the starts that await it)
        self._starting[key] = failed
        self._progress.pop(key, None)
        log.warning("zygote %s stopped (%s): none of its instances is left", key, z.hung)
        z.abort(z.hung)

    def _zygote_task(self, key: str) -> asyncio.Future:
        t = self._starting.get(key)
        if t is None or (t.done() and (key not in self.zygotes or self.zygotes[key].dead)):
            if t is not None and time.monotonic() - self._failed.get(key, -math.inf) < self.retry_s:
                return t  # its start failed moments ago: that error again (retry_s)
            t = self._starting[key] = asyncio.create_task(self._start_zygote(key))
            self._progress[key] = ZygoteProgress()
            t.add_done_callback(_retrieved)
        return t

    async def _start_zygote(self, key: str) -> Zygote:
        z = Zygote(key, *self._preload_for(key), fork_timeout_s=self.fork_timeout_s)
        t0 = time.monotonic()
        self._booting[key] = z  # its pid, for the starts waiting on its progress
        try:
            await z.start(zygote_child_env())
        except Exception:
            self._failed[key] = time.monotonic()
            raise
        finally:
            if self._booting.get(key) is z:
                del self._booting[key]
        self._failed.pop(key, None)
        failed = z.info.get("failed") or {}
        log.info(
            "zygote %s ready in %.2fs (pid %s, preloaded %s%s)",
            key,
            time.monotonic() - t0,
            z.info.get("pid"),
            ", ".join(z.info.get("preloaded", [])),
            f"; failed: {failed}" if failed else "",
        )
        self.zygotes[key] = z
        z.on_idle = self.retire
        self.retire()  # its function may have been deleted while it started
        return z

    async def zygote(self, key: str) -> Zygote | None:
        z = self.zygotes.get(key)
        if z is not None and not z.dead:
            if z.hung:  # its instances still run: a new one once they have ended (retire)
                log.warning("zygote %s forks no more (%s): starting a plain process", key, z.hung)
                return None
            return z
        try:
            return await asyncio.shield(self._zygote_task(key))
        except Exception as e:
            log.warning("zygote %s unavailable (%s): starting a plain process", key, e)
            return None

    async def spawn(
        self, spec: FunctionSpec | None, node: str, instance_id: str | None = None
    ) -> tuple[Instance, float]:
        key = self.key_for(spec)
        if self._state(key) != "ready":
            # no pool instance to take: wait for its zygote by the rule of the built-ins' one
            # with a pool instance (zygote_wait: while it shows progress, up to wait_max_s from
            # its start), then a plain process; not up to its 120 s start timeout
            self._zygote_task(key)
            name = spec.name if spec else "a pool instance"
            if not (await self._await_zygote(key, True, name, "as a plain process"))[0]:
                return await super().spawn(spec, node, instance_id)
        z = await self.zygote(key)
        if z is None:
            return await super().spawn(spec, node, instance_id)
        pre = self._stock.popleft() if self._stock else None
        self._refill()
        inst: ForkedInstance = self._new(
            spec,
            node,
            instance_id,
            ForkedInstance,
            eid=pre[0] if pre else None,
            preregistered=pre is not None,
            exit_code=asyncio.get_running_loop().create_future(),
        )
        boot = boot_record(spec, inst.id, inst.eid, node, self.pool_name, self.proxy_socket)
        if pre:
            boot["endpoint_mode"] = pre[3]
        env = zygote_child_env(spec.env if spec else None)
        req = {"boot": boot, "env": env, "log": self._log_path(inst.id)}
        self.on_started(inst)
        spawned = time.time()
        try:
            try:
                await z.fork(inst, req, [pre[1].fileno(), pre[2].fileno()] if pre else [])
            finally:
                if pre:  # the child holds the endpoint now (or, if the fork failed, nobody)
                    pre[1].close()
                    pre[2].close()
        except (ZygoteError, OSError) as e:
            log.warning("zygote %s could not fork (%s): starting a plain process", z.key, e)
            inst.ended(-1)
            self.watch(inst)  # reported as gone (it never ran)
            return await super().spawn(spec, node, None)
        self.watch(inst)
        return inst, spawned

    def _log_path(self, instance_id: str) -> str | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(Path(self.log_dir) / f"{instance_id}.log")

    async def close(self) -> None:
        self._closing = True
        if self._filling is not None:
            await asyncio.gather(self._filling, return_exceptions=True)
        while self._stock:
            _, ctrl, data, _ = self._stock.popleft()
            ctrl.close()
            data.close()
        await super().close()
        for t in self._starting.values():
            t.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        await asyncio.gather(*(z.close() for z in self.zygotes.values()), return_exceptions=True)
