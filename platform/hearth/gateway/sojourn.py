"""How long an invocation has waited inside the node gateway, and the bound on that wait.

Why: under overload a request waits in the gateway before any admission rule sees it. Its bytes
are read, then its connection's task and its handler's task each wait their turn in the event
loop; on a busy node every turn is long, and the wait grows with every request read meanwhile.
The loop-lag rule (`hearth.gateway.shed`) sheds only *sustained* lag, so that a burst is served;
the calls queued before it acts were served seconds late (replay at 2,000/s: 200s at p99 1-13 s
while the 503s took under 0.9 s).

So the node's wait bound (`HEARTH_MAX_QUEUE_WAIT_S`) counts from the moment the gateway *read*
the request, not from the moment its handler ran: a thin wrapper around each connection's
protocol (`ReadStamps`) notes when bytes were last read on it. A call that has already waited
longer than the bound when its handler runs is answered 503 + Retry-After at once (serving it
now would only make it, and every call behind it, later still), and one that goes on waits for
an instance only for what is left of the bound (then 429). Time spent in the kernel before the
gateway reads a request is not seen here: the accept backlog and the loop's own speed bound it.

`waited` and `over_wait` are the pure rule (the admission side is
`hearth.agent.admitter.wait_until`); `ReadStamps` and `listen` the thin
I/O shell.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from hearth.gateway.badrequest import protocols


def waited(received_at: float | None, now: float) -> float:
    """Seconds since the gateway read the request (0 when unknown: no stamp, nothing shed)."""
    return 0.0 if received_at is None else max(0.0, now - received_at)


def over_wait(received_at: float | None, now: float, max_wait_s: float | None) -> bool:
    """Whether the request has already waited longer than the bound (None or 0: no bound)."""
    return bool(max_wait_s) and waited(received_at, now) > max_wait_s


class _Tap(asyncio.Protocol):
    """Passes every protocol event to aiohttp's handler, noting when bytes were read."""

    __slots__ = ("_inner", "_stamps")

    def __init__(self, inner: asyncio.Protocol, stamps: ReadStamps) -> None:
        self._inner = inner
        self._stamps = stamps

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._stamps.at[self._inner] = time.monotonic()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stamps.at.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ReadStamps:
    """When bytes were last read on each open connection (monotonic), by aiohttp protocol.

    With HTTP/1.1 keep-alive the last read before a request's handler runs is that request's
    (a later read can only make the wait look shorter: never a false shed)."""

    def __init__(self) -> None:
        self.at: dict[object, float] = {}

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server`: `make()`'s protocols, stamped."""
        return lambda: _Tap(make(), self)

    def received_at(self, request: web.BaseRequest) -> float | None:
        return self.at.get(request.protocol)


READ_STAMPS = web.AppKey("read_stamps", ReadStamps)
#: an app's own connection protocol, wrapping aiohttp's: (aiohttp's protocol, stamps) -> protocol
#: that stamps every read too (the node gateway's fast path: `gateway.fastpath`)
TAP = web.AppKey("tap", Callable[[asyncio.Protocol, ReadStamps], asyncio.Protocol])


async def listen(
    runner: web.AppRunner, host: str, port: int, *, backlog: int = 4096
) -> asyncio.Server:
    """Serve `runner` (set up) on host:port with every read stamped into its app's
    `READ_STAMPS` (`aiohttp.web.TCPSite` without the stamps), through the app's `TAP` protocol
    if it has one. The caller closes the server before `runner.cleanup()`."""
    assert runner.server is not None and isinstance(runner.app, web.Application)
    stamps = runner.app[READ_STAMPS]
    tap = runner.app.get(TAP)
    make = protocols(runner.server)  # malformed requests answered as JSON (gateway.badrequest)
    factory = stamps.factory(make) if tap is None else lambda: tap(make(), stamps)
    return await asyncio.get_running_loop().create_server(
        factory, host, port, backlog=backlog, reuse_address=True
    )
