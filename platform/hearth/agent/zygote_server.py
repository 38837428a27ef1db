"""One zygote (fork server, hearth.runtime.zygote) as the agent sees it: its process, its
control socket, forks waiting for their pid, and the instances it forked. Which zygotes a node
runs and when a start waits for one is hearth.agent.zygote's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from hearth.agent.instance import ForkedInstance
from hearth.agent.zygote_wait import FORK_TIMEOUT_S
from hearth.runtime.zygote import MAX_MSG, pdeathsig

START_TIMEOUT_S = 120.0


class ZygoteError(RuntimeError):
    pass


class Zygote:
    """One fork server: its process, its control socket, forks waiting for their pid, and the
    instances it forked (their exits come back over the control socket). A fork it does not
    answer within `fork_timeout_s` fails that start only and marks it hung (`hang`)."""

    def __init__(
        self,
        key: str,
        preload: list[str],
        code_path: str | None = None,
        fork_timeout_s: float = FORK_TIMEOUT_S,
    ) -> None:
        self.key = key
        self.fork_timeout_s = fork_timeout_s
        self.preload = preload
        self.code_path = code_path
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.info: dict[str, Any] = {}
        # forks waiting for their pid: the future the fork awaits, and the instance it is for
        self.forks: dict[str, tuple[asyncio.Future, ForkedInstance]] = {}
        self.children: dict[int, ForkedInstance] = {}
        # children of given-up forks (killed), and ends seen through a pidfd: not yet reported
        self.late: set[int] = set()
        self.dead = False
        # why it forks no more (it did not answer a fork in time), None while it answers
        self.hung: str | None = None
        self.given_up: set[str] = set()  # forks given up: a child that still comes is killed
        self._watcher: asyncio.Task | None = None
        self.on_idle: Callable[[], None] = lambda: None  # its last running instance ended

    @property
    def running(self) -> int:
        """Instances forked from it that still run (or are being forked; not those given up)."""
        return len(self.children) + len(self.forks)

    def hang(self, why: str) -> None:
        """It did not answer a fork in time (stopped, hung): every fork waiting for it is given
        up (those starts go on without it) and it forks no more. It is not killed: the
        instances it forked die with it (pdeathsig) and still serve; the runner stops it once
        none is left (`on_idle`). A child of a given-up fork that still comes is killed. The
        ends of its instances are watched through their pidfds from now on: a stopped zygote
        neither reaps nor reports them, and it is stopped only once none is left."""
        if self.hung is not None or self.dead:
            return
        self.hung = why
        err = ZygoteError(why)
        for fid, (f, _) in list(self.forks.items()):
            self.given_up.add(fid)
            if not f.done():
                f.set_exception(err)
                f.exception()  # (retrieved: the fork that timed out no longer awaits it)
        self.forks.clear()
        loop = asyncio.get_running_loop()
        for pid, inst in self.children.items():
            if inst.pidfd >= 0:
                loop.add_reader(inst.pidfd, self._child_gone, pid)
        if not self.running:
            self.on_idle()

    def _child_gone(self, pid: int) -> None:
        """An instance of a hung zygote has ended (its pidfd is readable): its exit code is the
        zygote's to read, so it is unknown here (-1); a report that still comes is dropped."""
        inst = self.children.pop(pid, None)
        if inst is None:
            return
        self._unwatch(inst)
        self.late.add(pid)  # (its zygote's report of it, if it comes)
        inst.ended(-1)
        if not self.running:
            self.on_idle()

    def _unwatch(self, inst: ForkedInstance) -> None:
        if self.hung and inst.pidfd >= 0:  # (before `ended` closes it)
            try:
                asyncio.get_running_loop().remove_reader(inst.pidfd)
            except (RuntimeError, ValueError):
                pass

    async def start(self, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the agent's working directory first on the function's sys.path
                "-m",
                "hearth.runtime.zygote",
                str(theirs.fileno()),
                ",".join(self.preload),
                *([self.code_path] if self.code_path else []),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                preexec_fn=pdeathsig,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        self.sock = mine
        asyncio.get_running_loop().add_reader(mine.fileno(), self._readable)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self.ready), START_TIMEOUT_S)
        except BaseException as e:  # timed out, cancelled or failed: `abort`
            self.abort(f"zygote {self.key} did not start: {e!r}")
            if isinstance(e, TimeoutError):
                raise ZygoteError(f"zygote {self.key} not ready in {START_TIMEOUT_S:g} s") from None
            raise

    def abort(self, why: str) -> None:
        """Stop a zygote that did not come up, or a hung one with no instance left (`hang`).
        Left running, it is of no use (its state reads gone), and the next deploy or cold
        start would start another beside it: one more interpreter per trigger, until the agent
        dies."""
        self._gone(why)  # its control socket is closed, its reader removed
        if not self.ready.cancelled():
            self.ready.exception()  # (the start's own error is the one raised)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()  # (reaped by `_watch`)

    async def _watch(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        self._gone(f"zygote {self.key} exited with code {rc}")

    def _gone(self, why: str) -> None:
        """The zygote has ended: its children died with it (pdeathsig)."""
        if self.dead:
            return
        self.dead = True
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except (RuntimeError, ValueError):
                pass
            self.sock.close()
        err = ZygoteError(why)
        if not self.ready.done():
            self.ready.set_exception(err)
        for f, _ in self.forks.values():
            if not f.done():
                f.set_exception(err)
        for inst in self.children.values():
            self._unwatch(inst)
            inst.ended(-9)
        self.children.clear()

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                raw = self.sock.recv(MAX_MSG)
            except BlockingIOError:
                return
            except OSError as e:
                self._gone(f"zygote {self.key}: control socket failed: {e}")
                return
            if not raw:
                self._gone(f"zygote {self.key} closed its control socket")
                return
            self._message(json.loads(raw))

    def _message(self, m: dict[str, Any]) -> None:
        op = m.get("op")
        if op == "ready":
            if not self.ready.done():
                self.ready.set_result(m)
        elif op in ("forked", "error"):
            fid = m.get("id") or ""
            if fid in self.given_up:  # its start went on without it
                self.given_up.discard(fid)
                if op == "forked":
                    self._kill_late(int(m["pid"]))
                return
            waiting = self.forks.pop(fid, None)
            if waiting is None or waiting[0].done():
                return
            f, inst = waiting
            if op == "forked":
                self._adopt(inst, int(m["pid"]))
                f.set_result(inst.os_pid)
            else:
                f.set_exception(ZygoteError(f"zygote {self.key}: {m.get('error')}"))
        elif op == "exit":
            inst = self.children.pop(int(m["pid"]), None)
            if inst is not None:
                self._unwatch(inst)
                inst.ended(int(m["rc"]))
                if not self.running:
                    self.on_idle()
            else:  # a late child (killed), or an end seen already through its pidfd
                self.late.discard(int(m["pid"]))

    def _adopt(self, inst: ForkedInstance, pid: int) -> None:
        """Its child is `inst`'s: one of its running instances from the answer on, in the same
        step that takes the fork off `forks`. Added later (when the fork's task resumes), a
        fork answered as another one timed out was in neither: `hang` then watched no end of
        it and, with no other instance, stopped the zygote (killing the new child). The
        zygote sends a child's "forked" before its "exit" (one thread, one socket)."""
        try:
            inst.pidfd = os.pidfd_open(pid)
            inst.note_start(pid)  # (read after the pidfd: still that child)
        except OSError:
            inst.pidfd = -1  # already reaped (it failed at once): its exit report is on the way
        inst.os_pid = pid
        self.children[pid] = inst

    def _kill_late(self, pid: int) -> None:
        """A child forked after its start gave up on it: nobody waits for it (its endpoint, if
        it was registered ahead, closes with it); the zygote reaps it and reports its exit."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            self.late.add(pid)
        except OSError:
            pass
        finally:
            os.close(fd)

    async def fork(self, inst: ForkedInstance, req: dict[str, Any], fds: list[int]) -> int:
        """Fork an instance; `fds` (the control and data sockets of its endpoint, registered
        ahead) go with the request and end up in the child only."""
        if self.dead or self.sock is None:
            raise ZygoteError(f"zygote {self.key} is not running")
        if self.hung is not None:
            raise ZygoteError(self.hung)
        fut = asyncio.get_running_loop().create_future()
        # the zygote refuses a request it reads past its deadline (it was stopped meanwhile):
        # no child is forked for a start that went on without it (CLOCK_MONOTONIC is the
        # machine's, the same in both processes)
        deadline = time.monotonic() + self.fork_timeout_s
        msg = json.dumps({"op": "fork", "id": inst.id, "deadline": deadline, **req}).encode()
        self.forks[inst.id] = (fut, inst)
        try:
            socket.send_fds(self.sock, [msg], fds)
        except OSError:
            self.forks.pop(inst.id, None)  # never sent: no answer is coming
            raise
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.fork_timeout_s)
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # answered as the bound ran out
                return fut.result()  # (its child adopted already, or the zygote's error)
            # Without a bound, a zygote that stopped answering held this start (and every
            # later one of its functions) for ever; killing it would kill its instances too.
            self.hang(f"zygote {self.key} did not answer a fork in {self.fork_timeout_s:g} s")
            raise ZygoteError(self.hung or f"zygote {self.key} is gone") from None

    async def close(self) -> None:
        if self.sock is not None and not self.dead:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()  # the zygote sees EOF and exits
            self.dead = True
        if self.proc is not None and self.proc.returncode is None:
            if self.hung:  # it reads its socket no more (e.g. stopped): EOF would not end it
                self.proc.kill()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
