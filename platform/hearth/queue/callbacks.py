"""Where async-invocation callbacks may go: public addresses only, checked after DNS resolution.

A callback URL is chosen by whoever calls the gateway, and the node agent sends it a request from
inside the cluster: without a check, any caller could make the agent reach Redis, the cloud
metadata service (169.254.169.254) or the admin API on loopback (SSRF). So every address a host
name resolves to must be public (not private, loopback, link-local, multicast, reserved or
unspecified), literal IPs included; the check runs in the connector's resolver, on the very
addresses the connection uses (no DNS-rebinding window); and redirects are not followed.
``HEARTH_CALLBACK_ALLOW_NETS`` (comma-separated CIDRs, e.g. ``10.1.0.0/16``) opens chosen
internal networks for operators who need them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallbackRefused(ValueError):
    """The callback target is not allowed (an internal address)."""


def allowed_nets(env: str | None = None) -> list[IPNet]:
    raw = os.environ.get("HEARTH_CALLBACK_ALLOW_NETS", "") if env is None else env
    out = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"HEARTH_CALLBACK_ALLOW_NETS: {part!r} is not a CIDR") from None
    return out


def check_address(ip: str, allow: list[IPNet] | None = None) -> None:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    allow = allowed_nets() if allow is None else allow
    if any(addr in net for net in allow):
        return
    if not addr.is_global or addr.is_multicast:
        raise CallbackRefused(
            f"callback address {addr} is internal (private, loopback, link-local or reserved)"
        )


def check_url(url: str) -> None:
    """Scheme and, for IP literals, the address (names are checked when they are resolved)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise CallbackRefused(f"callback {url!r} must be an http(s) URL with a host")
    try:
        ipaddress.ip_address(u.hostname)
    except ValueError:
        return
    check_address(u.hostname)


class GuardedResolver(AbstractResolver):
    """DNS resolution that refuses internal addresses (the connector connects to what we return)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[dict[str, Any]]:
        infos = await self._inner.resolve(host, port, family)
        allow = allowed_nets()
        for info in infos:
            check_address(info["host"], allow)
        return infos

    async def close(self) -> None:
        await self._inner.close()


def session() -> aiohttp.ClientSession:
    """The client session callbacks are sent with."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=GuardedResolver()))
