"""Client side of the data plane: an instance's descriptor socket, registered with the proxy.

``Endpoint.register(proxy_socket, endpoint_id)`` connects to the node's proxy daemon, creates
a socket pair of the kind the daemon's mode needs (loopback TCP for eBPF, AF_UNIX for the
fallback) and hands it over with SCM_RIGHTS. ``send`` writes one 64-byte descriptor per
``sendmsg``; ``recv`` reads exactly 64 bytes (never merging two descriptors).

Unknown destination (both modes): ``send`` succeeds and the sender later ``recv``s an ERROR
descriptor with ``status=Status.UNKNOWN_DST``, ``src=PROXY_ID``, ``aux=<the dst>`` and the
same ``corr`` -- so a gateway matches it to the pending invocation like any reply.

Daemon restart: a background thread watches the control connection; when it closes, the
endpoint reconnects (retrying until ``close()``) and registers again under the same id with
a fresh socket pair. ``recv`` drains the old socket, then continues on the new one; ``send``
waits up to ``reconnect_timeout`` for the new registration. ``fileno()`` changes then.

The asyncio flavour (the agent's) is ``hearth.dataplane.async_endpoint.AsyncEndpoint``: kept
apart so an instance, which is threaded, never imports asyncio for it.
"""

from __future__ import annotations

import _thread
import collections
import errno
import os
import select
import socket
import threading
import time

from hearth.dataplane import control
from hearth.dataplane.descriptor import MAX_FRAMES, SIZE, Descriptor, Status

TYPE_CHECKING = False  # typing is not imported on the runtime's path (issue #19)
if TYPE_CHECKING:
    from typing import Any

RECV_CHUNK = MAX_FRAMES * SIZE  # one read takes up to this many bytes of descriptors


class _Log:
    """``logging.getLogger("hearth.dataplane")`` on first use: ``logging`` (with ``traceback``
    and ``string``) stays off the instance runtime's import path; endpoints log only when their
    proxy goes away."""

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger("hearth.dataplane"), name)


log = _Log()

RECONNECT_TIMEOUT = 10.0


class RegistrationError(RuntimeError):
    """The proxy daemon refused the registration (e.g. the id is taken)."""


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (the SOCKHASH needs TCP; AF_UNIX is not hooked by SK_MSG)."""
    for _ in range(5):
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            a = socket.create_connection(lst.getsockname())
            b, addr = lst.accept()
        finally:
            lst.close()
        if addr == a.getsockname():  # nobody raced us onto the ephemeral port
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return a, b
        a.close()
        b.close()
    raise ConnectionError("could not create a private loopback TCP pair")


def open_registration(
    proxy_socket: str, endpoint_id: int, timeout: float | None
) -> tuple[socket.socket, socket.socket, str]:
    """Register once: returns (control socket, data socket, mode). The registration lives as
    long as the control connection: whoever holds it (possibly another process, handed the
    two descriptors) owns the endpoint."""
    ctrl, hello = control.connect(proxy_socket, timeout)
    try:
        mode = hello.get("mode")
        if mode == "ebpf":
            data, peer = _tcp_pair()
            fds = [data.fileno(), peer.fileno()]
        elif mode == "unix":
            data, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds = [peer.fileno()]
        else:
            raise control.ProtocolError(f"proxy reports unknown mode {mode!r}")
        try:
            control.send_msg(ctrl, {"op": "register", "id": endpoint_id, "pid": os.getpid()}, fds)
            reply = control.recv_msg(ctrl)
        except BaseException:
            data.close()
            raise
        finally:
            peer.close()  # the daemon holds its own copy
        if not reply.get("ok"):
            data.close()
            raise RegistrationError(
                f"proxy {proxy_socket} refused endpoint {endpoint_id}: {reply.get('error')}"
            )
        ctrl.settimeout(None)
        data.settimeout(None)
        return ctrl, data, mode
    except BaseException:
        ctrl.close()
        raise


def register_options(
    *,
    reconnect: bool = True,
    timeout: float | None = 5.0,
    reconnect_timeout: float = RECONNECT_TIMEOUT,
) -> tuple[bool, float | None, float]:
    """The registration options of :class:`Endpoint` and ``AsyncEndpoint`` (one set, one
    default each): `reconnect` re-registers after a proxy restart, waiting up to
    `reconnect_timeout` seconds for it when sending; `timeout` bounds the first registration."""
    return reconnect, timeout, reconnect_timeout


def unknown_dst_error(d: Descriptor) -> Descriptor:
    """The ERROR the daemon would send; synthesized when the kernel drops (EACCES) a redirect."""
    return d.bounce(Status.UNKNOWN_DST)


class Registered:
    """What both endpoint flavours (blocking :class:`Endpoint`, asyncio ``AsyncEndpoint``) hold
    of their registration with the proxy, set up one way."""

    def _registered(
        self,
        proxy_socket: str,
        endpoint_id: int,
        ctrl: socket.socket,
        data: socket.socket,
        mode: str,
        reconnect_timeout: float,
    ) -> None:
        self.proxy_socket = proxy_socket
        self.endpoint_id = endpoint_id
        self.mode = mode
        self.reconnect_timeout = reconnect_timeout
        self.registrations = 1  # how many times we registered (1 + re-registrations)
        self._ctrl = ctrl
        self._data: socket.socket | None = data
        self._rsock: socket.socket | None = data  # the socket reads (and a partial frame) come from
        self._closed = False


class Endpoint(Registered):
    """A registered descriptor endpoint (blocking API; thread-safe send and recv)."""

    def __init__(
        self,
        proxy_socket: str,
        endpoint_id: int,
        ctrl: socket.socket,
        data: socket.socket,
        mode: str,
        *,
        reconnect: bool = True,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ):
        self._registered(proxy_socket, endpoint_id, ctrl, data, mode, reconnect_timeout)
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._rbuf = bytearray(RECV_CHUNK)
        self._inbuf = bytearray()  # received bytes not yet returned (whole frames + a partial)
        self._local: collections.deque[bytes] = collections.deque()
        self._watcher = reconnect  # a thread watches the control connection (re-registers)
        if reconnect:
            # a bare thread: Thread.start() would wait until the new thread runs, a scheduling
            # delay (up to ~10 ms on a busy node) on every cold start's path
            _thread.start_new_thread(self._watch, ())

    @classmethod
    def register(cls, proxy_socket: str, endpoint_id: int, **options: Any) -> Endpoint:
        """Register `endpoint_id` with the proxy at `proxy_socket`; `options` as
        :func:`register_options` (both endpoint flavours take the same)."""
        reconnect, timeout, reconnect_timeout = register_options(**options)
        ctrl, data, mode = open_registration(proxy_socket, endpoint_id, timeout)
        return cls(
            proxy_socket,
            endpoint_id,
            ctrl,
            data,
            mode,
            reconnect=reconnect,
            reconnect_timeout=reconnect_timeout,
        )

    @classmethod
    def from_fds(
        cls, proxy_socket: str, endpoint_id: int, ctrl_fd: int, data_fd: int, mode: str
    ) -> Endpoint:
        """An endpoint registered by someone else (the node agent registers ahead of a cold
        start and hands the control and data descriptors over): no round trip to the proxy."""
        ctrl = socket.socket(fileno=ctrl_fd)
        data = socket.socket(fileno=data_fd)
        for s in (ctrl, data):
            s.setblocking(True)  # the flag is shared with the registrar's (closed) copies
        return cls(proxy_socket, endpoint_id, ctrl, data, mode)

    # -- reconnection ----------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closed:
            ctrl = self._ctrl
            try:
                while ctrl.recv(4096):
                    pass  # the daemon sends nothing unsolicited; EOF means it went away
            except OSError:
                pass
            if self._closed:
                return
            log.warning(
                "endpoint %d: proxy control connection closed; re-registering", self.endpoint_id
            )
            with self._cond:
                self._data = None  # senders wait; the old socket is drained by recv
            delay = 0.02
            while not self._closed:
                try:
                    new_ctrl, data, mode = open_registration(
                        self.proxy_socket, self.endpoint_id, 2.0
                    )
                except (OSError, control.ProtocolError, RegistrationError) as e:
                    log.debug("endpoint %d: re-register failed: %s", self.endpoint_id, e)
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                with self._cond:
                    if self._closed:
                        new_ctrl.close()
                        data.close()
                        return
                    old_ctrl = self._ctrl
                    self._ctrl, self._data, self.mode = new_ctrl, data, mode
                    self.registrations += 1
                    self._cond.notify_all()
                old_ctrl.close()
                log.info("endpoint %d re-registered (%s)", self.endpoint_id, mode)
                break

    def _current(
        self, old: socket.socket | None = None, timeout: float | None = None
    ) -> socket.socket:
        """The live data socket (waiting for re-registration if it is down or is ``old``)."""
        limit = self.reconnect_timeout if timeout is None else min(timeout, self.reconnect_timeout)
        deadline = time.monotonic() + limit
        with self._cond:
            while not self._closed and (self._data is None or self._data is old):
                left = deadline - time.monotonic()
                if left <= 0 and timeout is not None and timeout < self.reconnect_timeout:
                    raise TimeoutError(
                        f"endpoint {self.endpoint_id}: re-registration still pending after the timeout"
                    )
                if left <= 0 or not self._watcher:
                    raise ConnectionError(
                        f"endpoint {self.endpoint_id}: proxy daemon at {self.proxy_socket} unreachable"
                    )
                self._cond.wait(left)
            if self._closed:
                raise ConnectionError(f"endpoint {self.endpoint_id} is closed")
            return self._data

    # -- data ------------------------------------------------------------------------------
    def send(self, d: Descriptor) -> None:
        """Send one descriptor (one ``sendmsg`` of 64 bytes)."""
        self.send_frame(d.pack())

    def send_frame(self, frame: bytes) -> None:
        """Send already packed descriptors: one 64-byte frame, or several for the same
        destination back to back (one ``sendmsg``; the eBPF program routes a message by its
        first descriptor)."""
        n = len(frame)
        if n != SIZE and (not n or n % SIZE or n > MAX_FRAMES * SIZE):
            raise ValueError(f"descriptor frames must be 1..{MAX_FRAMES} x {SIZE} bytes, got {n}")
        sock = self._data
        if sock is not None:  # hot path: one sendall, no retry bookkeeping
            lock = self._send_lock
            lock.acquire()  # (half the cost of a `with` block, which matters at ~10 us a hop)
            try:
                sock.sendall(frame)
                return
            except OSError as e:
                err = e
            finally:
                lock.release()
            self._send_failed(frame, sock, err)
            return
        self._send_failed(frame, None, None)

    def _send_failed(self, frame: bytes, sock: socket.socket | None, err: OSError | None) -> None:
        """The slow path of ``send_frame``: an unroutable frame or a daemon restart."""
        for _attempt in range(4):
            if isinstance(err, PermissionError):
                # eBPF: the kernel dropped the redirect (destination socket just went away)
                self._unrouted(frame)
                return
            if err is not None and err.errno not in (
                errno.EPIPE,
                errno.ECONNRESET,
                errno.ENOTCONN,
                errno.EBADF,
            ):
                raise err
            # the daemon restarted (or is restarting): wait for the new registration
            sock = self._current(old=sock) if err is not None else self._current()
            try:
                with self._send_lock:
                    sock.sendall(frame)
                return
            except OSError as e:
                err = e
        raise ConnectionError(f"endpoint {self.endpoint_id}: could not send after re-registering")

    def recv(self, timeout: float | None = None) -> Descriptor:
        """Receive one descriptor; ``TimeoutError`` after ``timeout`` seconds (None = wait)."""
        return Descriptor.unpack(self.recv_frame(timeout))

    def _unrouted(self, frames: bytes) -> None:
        for i in range(0, len(frames), SIZE):
            d = Descriptor.unpack(frames[i : i + SIZE])
            self._local.append(unknown_dst_error(d).pack())

    def buffered(self) -> int:
        """Descriptors already received that `recv` returns without a system call."""
        return len(self._local) + len(self._inbuf) // SIZE

    def recv_frame(self, timeout: float | None = None) -> bytes:
        """Receive one descriptor as its 64 raw bytes. Reads take what is there (up to
        RECV_CHUNK), so descriptors sent together cost one system call, not one each."""
        sock = self._rsock
        if timeout is None and sock is not None and not self._local and not self._inbuf:
            # hot path: nothing buffered -> one recv, its bytes are the frame
            self._recv_lock.acquire()
            try:
                if not self._local and not self._inbuf and sock is self._rsock:
                    try:
                        data = sock.recv(RECV_CHUNK)
                    except (ValueError, OSError):
                        data = None  # closed or reset under us: the slow path sorts it out
                    if data is not None and len(data) == SIZE:
                        return data
                    if data:
                        self._inbuf += data
            finally:
                self._recv_lock.release()
        return self._recv_frame_slow(timeout)

    def _recv_frame_slow(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            while True:
                if self._local:
                    return self._local.popleft()
                if len(self._inbuf) >= SIZE:
                    frame = bytes(self._inbuf[:SIZE])
                    del self._inbuf[:SIZE]
                    return frame
                if self._rsock is None:
                    self._rsock = self._current(timeout=self._left(deadline, 1e9))
                sock = self._rsock
                left = self._left(deadline, None)
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"endpoint {self.endpoint_id}: no descriptor within {timeout} s"
                    )
                try:
                    # without a timeout a blocking read is enough (close() shuts it down)
                    ready = left is None or _wait_readable(sock, left)
                    if not ready:
                        continue
                    n = sock.recv_into(self._rbuf, RECV_CHUNK)
                except (ValueError, OSError) as e:  # closed under us
                    if isinstance(e, OSError) and e.errno not in (
                        errno.EBADF,
                        errno.ECONNRESET,
                        errno.ENOTCONN,
                        None,
                    ):
                        raise
                    n = 0
                if n == 0:  # old socket drained: wait for the new registration
                    self._inbuf.clear()
                    self._rsock = None
                    self._current(old=sock, timeout=self._left(deadline, 1e9))
                    if sock is not self._data:
                        sock.close()
                    continue
                if n == SIZE and not self._inbuf:  # the common case: exactly one descriptor
                    return bytes(memoryview(self._rbuf)[:SIZE])
                self._inbuf += memoryview(self._rbuf)[:n]

    @staticmethod
    def _left(deadline: float | None, default: float | None) -> float | None:
        return default if deadline is None else deadline - time.monotonic()

    @property
    def data_socket(self) -> socket.socket | None:
        """The current data socket (for selectors/benchmarks; replaced on re-registration)."""
        return self._data

    def fileno(self) -> int:
        """The current data socket's fd (changes when the endpoint re-registers)."""
        s = self._data
        return s.fileno() if s is not None else -1

    def close(self) -> None:
        """Leave the node: closing the control connection deletes our route in the daemon."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for s in (self._ctrl, self._data, self._rsock):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Endpoint(id={self.endpoint_id}, mode={self.mode}, proxy={self.proxy_socket!r})"


def _wait_readable(sock: socket.socket, timeout: float | None) -> bool:
    fd = sock.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, "socket closed")
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))


def proxy_stats(proxy_socket: str, timeout: float | None = 5.0) -> dict[str, Any]:
    """Mode and per-destination counters of the node's proxy daemon."""
    reply = control.request(proxy_socket, {"op": "stats"}, timeout)
    if not reply.get("ok"):
        raise RuntimeError(f"proxy {proxy_socket}: {reply.get('error')}")
    reply.pop("ok", None)
    return reply


def proxy_mode(proxy_socket: str, timeout: float | None = 5.0) -> str:
    """The mode (``ebpf`` or ``unix``) the node's proxy daemon runs in."""
    return control.request(proxy_socket, {"op": "mode"}, timeout)["mode"]
