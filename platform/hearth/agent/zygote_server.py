"""One zygote (fork server, hearth.runtime.zygote) as the agent sees it: its process, its
control socket, forks waiting for their pid, and the instances it forked. Which zygotes a node
runs and when a start waits for one is hearth.agent.zygote's."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from hearth.agent.instance import ForkedInstance
from hearth.runtime.zygote import MAX_MSG, pdeathsig

START_TIMEOUT_S = 120.0


class ZygoteError(RuntimeError):
    pass


class Zygote:
    """One fork server: its process, its control socket, forks waiting for their pid, and the
    instances it forked (their exits come back over the control socket)."""

    def __init__(self, key: str, preload: list[str], code_path: str | None = None) -> None:
        self.key = key
        self.preload = preload
        self.code_path = code_path
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.info: dict[str, Any] = {}
        self.forks: dict[str, asyncio.Future] = {}
        self.children: dict[int, ForkedInstance] = {}
        self.early_exits: dict[int, int] = {}
        self.dead = False
        self._watcher: asyncio.Task | None = None
        self.on_idle: Callable[[], None] = lambda: None  # its last running instance ended

    @property
    def running(self) -> int:
        """Instances forked from it that still run (or are being forked)."""
        return len(self.children) + len(self.forks)

    async def start(self, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
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
        """Stop a zygote that did not come up. Left running, it is of no use (its state reads
        gone), and the next deploy or cold start would start another beside it: one more
        interpreter per trigger, until the agent dies."""
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
        for f in self.forks.values():
            if not f.done():
                f.set_exception(err)
        for inst in self.children.values():
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
            f = self.forks.pop(m.get("id") or "", None)
            if f is not None and not f.done():
                if op == "forked":
                    f.set_result(int(m["pid"]))
                else:
                    f.set_exception(ZygoteError(f"zygote {self.key}: {m.get('error')}"))
        elif op == "exit":
            inst = self.children.pop(int(m["pid"]), None)
            if inst is not None:
                inst.ended(int(m["rc"]))
                if not self.running:
                    self.on_idle()
            else:
                self.early_exits[int(m["pid"])] = int(m["rc"])

    async def fork(self, inst: ForkedInstance, req: dict[str, Any], fds: list[int]) -> int:
        """Fork an instance; `fds` (the control and data sockets of its endpoint, registered
        ahead) go with the request and end up in the child only."""
        if self.dead or self.sock is None:
            raise ZygoteError(f"zygote {self.key} is not running")
        fut = asyncio.get_running_loop().create_future()
        self.forks[inst.id] = fut
        socket.send_fds(self.sock, [json.dumps({"op": "fork", "id": inst.id, **req}).encode()], fds)
        pid = await fut
        try:
            inst.pidfd = os.pidfd_open(pid)
            inst.note_start(pid)  # (read after the pidfd: still that child)
        except OSError:
            inst.pidfd = -1  # already reaped (it failed at once): its exit report is on the way
        inst.os_pid = pid
        if pid in self.early_exits:
            inst.ended(self.early_exits.pop(pid))
        else:
            self.children[pid] = inst
        return pid

    async def close(self) -> None:
        if self.sock is not None and not self.dead:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()  # the zygote sees EOF and exits
            self.dead = True
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
