"""A private redis-server: started by `hearth up` when HEARTH_REDIS_URL is unset, and by the test
suite. The real server, not an emulation.

`hearth up` runs it on a unix socket inside its 0700 state directory (no TCP port at all), so
other local users cannot reach it; where the socket path would be too long it listens on
loopback TCP with a random ``requirepass`` that lives only in owner-only files (the config file
and ``redis-url``), never on a command line. A pidfile in the data directory lets the next start
stop a server orphaned by a SIGKILLed agent before a second one opens the same files."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hearth.parent_death import die_with_parent


class RedisUnavailable(RuntimeError):
    pass


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in EPHEMERAL.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a server about to bind it. Drawn at random below (or
    above) the kernel's ephemeral range: `bind(0)` would hand out a port from that range, the
    one every outgoing connection on the machine takes its source port from, so between the
    pick and the server's bind a client socket could take it (seen with test processes side by
    side: `address already in use`). Outside it only another explicit bind can collide."""
    lo, hi = _ephemeral_range()
    spans = [(a, b) for a, b in ((10_000, lo - 1), (hi + 1, 65_535)) if b - a >= 1000]
    for _ in range(64 if spans else 0):
        a, b = spans[secrets.randbelow(len(spans))]
        port = a + secrets.randbelow(b - a + 1)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room outside the range: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


@dataclass
class RedisServer:
    """``private=True`` (what `hearth up` uses): unix socket in ``data_dir`` or, if that path is
    too long, loopback TCP with a random password; the server dies with its parent and an
    orphan left on the same ``data_dir`` is stopped first."""

    data_dir: Path
    port: int = 0
    persist: bool = False
    private: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    unix_socket: Path | None = None

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}?db=0"
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def _conf(self) -> list[str]:
        """Settings for the config file (0600): secrets never appear in the process list."""
        lines = [
            f"dir {self.data_dir}",
            f"pidfile {self.pidfile}",
            "daemonize no",
            "loglevel warning",
            f"logfile {self.data_dir / 'redis.log'}",
            "protected-mode yes",
        ]
        if self.unix_socket is not None:
            lines += ["port 0", f"unixsocket {self.unix_socket}", "unixsocketperm 700"]
        else:
            lines += ["bind 127.0.0.1", f"port {self.port}"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        lines += (
            ["appendonly yes", "appendfsync everysec"]
            if self.persist
            else ['save ""', "appendonly no"]
        )
        return lines

    def stop_orphan(self, timeout: float = 10.0) -> int | None:
        """Stop a redis-server still running on this data directory (its agent was killed);
        returns its pid, or None when there was none."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        if b"redis-server" not in cmd or Path(cwd).resolve() != self.data_dir.resolve():
            return None  # the pid was reused by something else: not ours to stop
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.02)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        return pid

    def start(self, timeout: float = 10.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisUnavailable(
                "redis-server not found: run `make install` (apt package redis-server)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)
        if self.private:
            self.stop_orphan()
            sock = self.data_dir / "redis.sock"
            if len(str(sock)) <= UNIX_PATH_MAX:
                self.unix_socket = sock
            else:
                self.password = self.password or secrets.token_urlsafe(32)
        if self.unix_socket is None and not self.port:
            self.port = free_port()
        conf = self.data_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(self._conf()) + "\n")
        self.proc = subprocess.Popen(
            [exe, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.data_dir,
            # SIGTERM (a clean shutdown that flushes the AOF) when the process that started it
            # dies, however it dies: a test run or benchmark stopped with SIGTERM or SIGKILL
            # left its servers running before (its own session keeps Ctrl-C from them)
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        deadline = time.monotonic() + timeout
        where = self.unix_socket or f"port {self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (
                    (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
                    if (self.data_dir / "redis.log").exists()
                    else ""
                )
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {log}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer on {where} within {timeout}s")

    def _ping(self) -> bool:
        try:
            if self.unix_socket is not None:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(0.2)
                s.connect(str(self.unix_socket))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            with s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    if not s.recv(16).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

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
