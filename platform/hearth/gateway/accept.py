"""The node gateway's accept: a new connection's transport built in the accept callback (#19).

Why: asyncio's selector loop accepts in a task. Its accept callback creates a task
(`_accept_connection2`); that task's step, a loop pass later, builds the transport, which
schedules the protocol's `connection_made` and the socket's reader for the pass after that;
the first read comes a pass later still. A client that opens a connection and writes its
request at once (what a load balancer's new connection, or `http.client`, does) waits
through those passes: measured in the agent, the accept callback ran 0.17 ms after the
client's clock started and `connection_made` 0.2 ms after the accept (7 Dec 2026, load ~7,
14 warm-pool starts), before the request's own read. Here the accept callback builds the
transport itself, as that task would: `connection_made` and the reader run in the next pass
(as asyncio's transport schedules them), with no task, coroutine or future per connection.

Kept from asyncio's accept, on purpose: up to `backlog` accepts per readiness of the
listening socket; the same transport class (its flow control, buffers and close), counted by
the `asyncio.Server` (`close` and `wait_closed` see it); on EMFILE, ENFILE, ENOBUFS or ENOMEM
the listening socket's reader is removed and put back after asyncio's
`ACCEPT_RETRY_DELAY` (a node out of descriptors does not spin), the error reported through
the loop's exception handler. It needs two private parts of asyncio's selector loop
(`_make_socket_transport`, `Server._sockets`, both unchanged from 3.8 to 3.13): on any other
loop (uvloop, a proactor) `serve` leaves the server to asyncio's own accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from asyncio import constants
from collections.abc import Callable

log = logging.getLogger("hearth.gateway")

_OUT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def lean(loop: asyncio.AbstractEventLoop, server: asyncio.Server) -> bool:
    """Whether `serve` can take `server`'s accepts on `loop` (asyncio's selector loop)."""
    return (
        isinstance(loop, asyncio.SelectorEventLoop)
        and hasattr(loop, "_make_socket_transport")
        and isinstance(getattr(server, "_sockets", None), list)
    )


def serve(
    loop: asyncio.AbstractEventLoop,
    server: asyncio.Server,
    factory: Callable[[], asyncio.Protocol],
    backlog: int,
) -> None:
    """Start accepting on `server`'s sockets (made with ``start_serving=False``; `lean` said
    yes): each connection's transport built in the accept callback. `server.close()` stops it
    (asyncio's `_stop_serving` removes the reader by descriptor and closes the socket)."""
    for sock in server._sockets:  # type: ignore[attr-defined]
        sock.listen(backlog)  # (what `Server.start_serving` does first)
        loop.add_reader(sock.fileno(), _accept, loop, server, factory, sock, backlog)


def _accept(
    loop: asyncio.AbstractEventLoop,
    server: asyncio.Server,
    factory: Callable[[], asyncio.Protocol],
    sock: socket.socket,
    backlog: int,
) -> None:
    """asyncio's `_accept_connection` with `_accept_connection2`'s work done in place."""
    for _ in range(backlog):
        try:
            conn, addr = sock.accept()
            conn.setblocking(False)
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # nothing more queued
        except OSError as exc:
            if exc.errno not in _OUT_OF:
                raise  # the loop logs it and goes on (as for asyncio's own accept)
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": exc}
            )
            fd = sock.fileno()
            loop.remove_reader(fd)
            loop.call_later(
                constants.ACCEPT_RETRY_DELAY, _resume, loop, server, factory, sock, backlog
            )
            return
        try:
            protocol = factory()
            loop._make_socket_transport(  # type: ignore[attr-defined]
                conn, protocol, extra={"peername": addr}, server=server
            )
        except Exception:  # (asyncio's task would swallow it): one connection lost, logged
            log.exception("could not set up an accepted connection from %r", addr)
            conn.close()


def _resume(
    loop: asyncio.AbstractEventLoop,
    server: asyncio.Server,
    factory: Callable[[], asyncio.Protocol],
    sock: socket.socket,
    backlog: int,
) -> None:
    """Accept again after running out of descriptors, unless the server closed meanwhile."""
    if sock.fileno() >= 0 and server._sockets is not None:  # type: ignore[attr-defined]
        loop.add_reader(sock.fileno(), _accept, loop, server, factory, sock, backlog)
