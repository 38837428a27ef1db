"""A private, loopback-only redis-server: started by `hearth up` when HEARTH_REDIS_URL is unset,
and by the test suite. The real server, not an emulation."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class RedisUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    data_dir: Path
    port: int = 0
    persist: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisUnavailable(
                "redis-server not found: run `make install` (apt package redis-server)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.port:
            self.port = free_port()
        args = [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        args += (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (
                    (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
                    if (self.data_dir / "redis.log").exists()
                    else ""
                )
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (tests of reconnection)."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def state_dir() -> Path:
    d = Path(os.environ.get("HEARTH_STATE_DIR") or Path.home() / ".local" / "state" / "hearth")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d
