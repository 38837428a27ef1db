"""The front gateway's name resolution for its node agents, kept off the call path.

Why: the front names its agents (`http://node-a:8080`, or a headless Service behind
`dns+http://…`), and the network's DNS fails exactly when nodes do. After a `podman kill` the
container network's resolver (aardvark-dns) answered no name at all for ~10-40 s, the live nodes'
names included (measured 2026-12-06, podman 4.3 / aardvark-dns 1.4; Kubernetes' cluster DNS can
stall the same way). With aiohttp's own cache a name was looked up again every 2 s inside the
call, the lookup bounded only by the call's total timeout, so every call to the *live* agents
waited for it, then all were released at once: seconds of latency, a burst, and the front's
loop so far behind that it shed (CI rehearsals 6 and 8: 437 x 503 `overloaded`, p50 9.3 s).

Here a name's last good addresses are used at once. A name older than `refresh_s` is looked up
again in the background, one lookup per name at a time, each in a daemon thread of its own (a hung
lookup holds no shared executor and does not delay exit); a failed or hung lookup keeps the last
good addresses (a dead node's old address fails at connect, which the front fails over and its
health record remembers). Only a name never resolved is waited for, at most `timeout_s`.

`NameState`, `needs_lookup` and `settle` are the pure core; `Names` is the shell, also usable as
an aiohttp resolver (`TCPConnector(resolver=names, use_dns_cache=False)`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult

Address = tuple[int, str]  # (family, IP)
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


@dataclass
class NameState:
    addrs: tuple[Address, ...] = ()  # the last good answer
    resolved_at: float | None = None  # when it came
    failed_at: float | None = None  # the last lookup that failed (or found nothing)
    pending_since: float | None = None  # a lookup in flight since then
    error: str = ""


def needs_lookup(st: NameState, now: float, refresh_s: float) -> bool:
    """Whether to start a lookup now: none in flight, and the last answer (or failure) is older
    than `refresh_s`. A lookup that hangs is never doubled: the name waits for it."""
    if st.pending_since is not None:
        return False
    last = max((t for t in (st.resolved_at, st.failed_at) if t is not None), default=None)
    return last is None or now - last >= refresh_s


def settle(st: NameState, now: float, addrs: Sequence[Address], error: str = "") -> None:
    """A lookup ended: a non-empty answer replaces the addresses; a failure keeps them."""
    st.pending_since = None
    if addrs:
        st.addrs, st.resolved_at, st.error = tuple(dict.fromkeys(addrs)), now, ""
    else:
        st.failed_at, st.error = now, error or "no address"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _getaddrinfo(host: str, port: int, family: int) -> list[Address]:
    infos = socket.getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
    )
    return [
        (int(f), str(a[0])) for f, _, _, _, a in infos if f in (socket.AF_INET, socket.AF_INET6)
    ]


class Names(AbstractResolver):
    """Names of node agents -> their last good addresses (see the module docstring)."""

    def __init__(self, refresh_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.names: dict[tuple[str, int, int], NameState] = {}
        self._waiters: dict[tuple[str, int, int], asyncio.Future[None]] = {}

    def refresh(self, targets: Iterable[tuple[str, int]], family: int = 0) -> None:
        """Start a background lookup of each (host, port) that is due: the front's agents keep
        current addresses before any call goes to them (the node a call fails over to is then
        known even while the DNS is down)."""
        for host, port in targets:
            if _is_ip(host):
                continue
            key = (host.rstrip(".").lower(), port, int(family))
            st = self.names.setdefault(key, NameState())
            if needs_lookup(st, time.monotonic(), self.refresh_s):
                self._start(key, st)

    def resolved(self, host: str, port: int, family: int = 0) -> bool:
        """Whether a call to (host, port) connects at once: an IP, or a name with addresses.
        A name never resolved makes its first call wait (the front's /healthz lists those)."""
        if _is_ip(host):
            return True
        st = self.names.get((host.rstrip(".").lower(), port, int(family)))
        return st is not None and bool(st.addrs)

    async def warm(self, targets: Iterable[tuple[str, int]], family: int = 0) -> None:
        """`refresh`, then wait (at most `timeout_s`) for the names never resolved yet."""
        targets = [t for t in targets if not _is_ip(t[0])]
        self.refresh(targets, family)
        await asyncio.gather(
            *(self.lookup(h, p, family) for h, p in targets), return_exceptions=True
        )

    async def lookup(self, host: str, port: int = 0, family: int = 0) -> list[Address]:
        """The addresses to connect to now. Raises `socket.gaierror` only for a name that has
        never resolved (after at most `timeout_s`)."""
        key = (host.rstrip(".").lower(), port, int(family))
        st = self.names.setdefault(key, NameState())
        if needs_lookup(st, time.monotonic(), self.refresh_s):
            self._start(key, st)
        if st.addrs:
            return list(st.addrs)
        waiter = self._waiters.get(key)
        if waiter is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.timeout_s)
            except TimeoutError:
                pass
        if st.addrs:
            return list(st.addrs)
        why = st.error or f"no answer within {self.timeout_s:g} s"
        raise socket.gaierror(socket.EAI_AGAIN, f"cannot resolve {host}: {why}")

    def _start(self, key: tuple[str, int, int], st: NameState) -> None:
        loop = asyncio.get_running_loop()
        st.pending_since = time.monotonic()
        waiter = self._waiters[key] = loop.create_future()

        def done(addrs: list[Address], error: str) -> None:
            settle(st, time.monotonic(), addrs, error)
            if self._waiters.get(key) is waiter:
                del self._waiters[key]
            if not waiter.done():
                waiter.set_result(None)

        def run() -> None:  # in its own daemon thread: getaddrinfo blocks, maybe for 40 s
            try:
                addrs, error = _getaddrinfo(*key), ""
            except Exception as e:  # OSError, or UnicodeError for a name IDNA refuses: an
                addrs, error = [], str(e)  # ended lookup either way, else in flight for ever
            try:
                loop.call_soon_threadsafe(done, addrs, error)
            except RuntimeError:  # the loop closed while the lookup hung
                pass

        try:
            threading.Thread(target=run, name=f"front-dns-{key[0]}", daemon=True).start()
        except RuntimeError as e:  # no thread to be had: a failed lookup, tried again later
            done([], f"cannot start a lookup: {e}")

    # -- aiohttp's resolver interface ------------------------------------------------------
    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=ip, port=port, family=fam, proto=0, flags=_NUMERIC)
            for fam, ip in await self.lookup(host, port, family)
        ]

    async def close(self) -> None:
        """Nothing to release: a lookup still running ends in its daemon thread."""
