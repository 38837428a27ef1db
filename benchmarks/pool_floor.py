"""The floor of a warm-pool start, and the host's bare wake-up, for the cold-start benchmark.

A pool start is serial CPU work on one vCPU through three processes (client -> agent ->
instance), so in the host's slow state its wake-ups and IPC cost several times what they
cost quietly, and one run's warm-pool figure cannot tell the host's share from the code's.
This times the same chain of hops with no Hearth code, in the same run, one sample beside
each pool start (cold_start.py takes it just before the start's deploy), so both see the same
host state, and the floor's processes wait between samples as long as a pool instance waits
for its start (it is refilled right after the start before it: one round of the benchmark's
loop, 170-230 ms start to start on 8 Dec 2026, 01:20: floor6-probe-period.log):

  floor       the benchmark's own client opens a new loopback TCP connection and writes a
              minimal HTTP/1.1 POST (the pool start's body) to a plain server process
              (`selectors`, pre-started, idle since the last sample), which reads it whole and
              sends a ~100-byte message (like a spec) over an AF_UNIX socket to a worker it
              forked at its start (imports done, idle); the worker's first line stamps
              `time.time()` (the clock of the probe handler's first line and of the client's
              write stamp) and reports it back; floor = that stamp - the client's first write
  host wake   a sleeper blocked on a SOCK_SEQPACKET socketpair, woken after 0.2 s idle: send
              -> its first line (as `scripts/wake_placement.py free 0` measures); taken after
              the pool starts, not between them: 0.8 s more idle before each pool start (the
              first version's wake samples) read 5.3-7.8 ms against 3.0 (8 Dec 2026, 01:03)

The server listens on 127.0.0.1 only; the worker's socket is owner-only (0600) in a private
(0700) directory. The server runs in its own session (a Ctrl-C reaches the benchmark, whose
`with` stops it) and it, its worker and the sleeper die with their parent (PR_SET_PDEATHSIG).

    python benchmarks/pool_floor.py serve DIR FD   (started by `Floor`, not by hand)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

IDLE_S = 0.2  # each host wake sample's sleeper sleeps this long before it
WAKE_SAMPLES = 20
# what the worker is sent: about a spec's size (the pool start's spec and request go in one
# message; the floor sends the spec's share only, so it stays a floor)
SPEC = (
    b'{"name":"cb-p-0","handler":"cb_probe:hello","code_path":"/tmp/code",'
    b'"preload":["numpy","asyncio"],"id":1}'
)
_PR_SET_PDEATHSIG = 1
LEGEND = (  # the benchmark's table prints it under the figures
    "pool_floor_ms: a pool start's hops with no Hearth code (new connection, HTTP POST, plain "
    "server, AF_UNIX message to an idle worker's first line), one sample before each pool "
    "start: the host's share of warm_pool_ms; host_wake_us: a bare wake-up after 0.2 s idle"
)


def _die_with_parent() -> None:
    """SIGTERM when the parent dies, however it dies (a SIGKILLed benchmark leaves none)."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _fork(run: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            _die_with_parent()
            run()
        finally:
            os._exit(0)
    return pid


def _worker(path: str) -> None:
    """The pool instance's stand-in: connected, idle in recv; stamps its first line."""
    w = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    w.connect(path)
    while True:
        m = w.recv(4096)
        t = time.time()  # the first line after the wake-up, as the probe handler's
        if not m:
            return
        w.send(repr(t).encode())


def _sleeper(fd: int) -> None:
    s = socket.socket(fileno=fd)
    while True:
        m = s.recv(64)
        t = time.perf_counter_ns()
        if not m:
            return
        s.send(str(t).encode())


def _request_done(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def serve(sock_dir: str, wake_fd: int) -> None:
    """The plain server: one request at a time, each relayed to the worker and answered with
    its stamp (`{"t": ...}`, as the probe handler answers); stops when its stdin closes."""
    _die_with_parent()
    path = os.path.join(sock_dir, "worker.sock")
    ul = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        ul.bind(path)
    finally:
        os.umask(old)
    ul.listen(1)

    def worker() -> None:
        ul.close()
        os.close(wake_fd)
        _worker(path)

    def sleeper() -> None:
        ul.close()
        _sleeper(wake_fd)

    children = [_fork(worker), _fork(sleeper)]
    os.close(wake_fd)
    ws, _ = ul.accept()
    ul.close()
    os.unlink(path)  # connected: nobody else needs the name
    lst = socket.create_server(("127.0.0.1", 0))
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ)
    sel.register(0, selectors.EVENT_READ)
    sys.stdout.write(f"{lst.getsockname()[1]}\n")
    sys.stdout.flush()
    bufs: dict[socket.socket, bytes] = {}
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj == 0:
                    if not os.read(0, 64):
                        return
                elif key.fileobj is lst:
                    conn, _ = lst.accept()
                    conn.setblocking(False)
                    bufs[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                else:
                    conn = key.fileobj
                    chunk = conn.recv(65536)
                    bufs[conn] += chunk
                    if chunk and not _request_done(bufs[conn]):
                        continue
                    sel.unregister(conn)
                    if chunk:
                        ws.send(SPEC)
                        body = b'{"t":' + ws.recv(64) + b"}"
                        conn.setblocking(True)
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                        )
                    del bufs[conn]
                    conn.close()
    finally:
        ws.close()  # the worker's recv ends; the sleeper's ends when the benchmark closes its end
        for pid in children:
            os.waitpid(pid, 0)


class Floor:
    """The floor's processes, up for the `with` block: `url` takes the benchmark's client
    (`timed_call`), `wake_us()` takes one host wake-up sample."""

    def __init__(self, tmp_root: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hearth-floor-", dir=tmp_root))  # 0700
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.samples: list[float] = []  # floor samples, ms
        self.wakes: list[float] = []  # host wake-ups, us
        self._wake: socket.socket | None = None

    def __enter__(self) -> Floor:
        try:
            self._wake, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with theirs:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", __file__, "serve", str(self.dir), str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    start_new_session=True,  # a Ctrl-C is the benchmark's to handle
                )
            port = self.proc.stdout.readline().strip()
            if not port:
                raise RuntimeError(f"the floor's server did not start ({self.proc.wait(5)})")
            self.url = f"http://127.0.0.1:{int(port)}"
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sample(self, call: Callable[[Floor], float]) -> None:
        """One floor sample: `call` times one request to `url` (ms)."""
        self.samples.append(call(self))

    def wake_samples(self, n: int = WAKE_SAMPLES) -> None:
        """n host wake-ups, each after IDLE_S asleep (n x 0.2 s)."""
        for _ in range(n):
            self.wakes.append(self.wake_us())

    def wake_us(self) -> float:
        """One bare wake-up (us): after IDLE_S asleep, a send -> the sleeper's first line."""
        assert self._wake is not None
        time.sleep(IDLE_S)
        t0 = time.perf_counter_ns()
        self._wake.send(b"go")
        return (int(self._wake.recv(64)) - t0) / 1000

    def close(self) -> None:
        """Stops the server, its worker and the sleeper (EOF on their sockets and its stdin;
        the server's process group is killed if it has not ended within 5 s)."""
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        p, self.proc = self.proc, None
        if p is not None:
            with contextlib.suppress(OSError):
                p.stdin.close()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the server and its forks
                p.wait()
            p.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2], int(sys.argv[3]))
