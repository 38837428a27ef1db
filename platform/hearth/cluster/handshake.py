"""A new link connection: its socket options and the mutual HMAC handshake (the cluster token
never crosses the network)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket

from hearth.cluster.framing import AuthError
from hearth.cluster.reader import Reader
from hearth.cluster.writer import send_all

MAGIC = b"HRTHLNK1"

NONCE = 16

MAC = 32


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"|".join(parts), hashlib.sha256).digest()


async def _read_n(reader: Reader, n: int) -> bytes:
    return bytes(await reader.exact(n))


async def handshake_client(
    sock: socket.socket, reader: Reader, token: bytes, me: str, timeout: float = 5.0
) -> str:
    """Prove we hold the token and check that the peer does too; returns the peer's node name."""

    async def run() -> str:
        hello = await _read_n(reader, len(MAGIC) + NONCE)
        if hello[: len(MAGIC)] != MAGIC:
            raise AuthError("the peer does not speak the Hearth link protocol")
        ns = hello[len(MAGIC) :]
        nc = os.urandom(NONCE)
        name = me.encode()[:255]
        await send_all(sock, [bytes([len(name)]), name, nc, _mac(token, b"c", ns, nc, name)])
        ok = await _read_n(reader, 1)
        if ok != b"\x01":
            raise AuthError("the peer rejected our cluster token")
        ln = (await _read_n(reader, 1))[0]
        peer = await _read_n(reader, ln)
        mac = await _read_n(reader, MAC)
        if not hmac.compare_digest(mac, _mac(token, b"s", nc, ns, peer)):
            raise AuthError("the peer could not prove it holds the cluster token")
        return peer.decode()

    return await asyncio.wait_for(run(), timeout)


async def handshake_server(
    sock: socket.socket, reader: Reader, token: bytes, me: str, timeout: float = 5.0
) -> str:
    async def run() -> str:
        ns = os.urandom(NONCE)
        await send_all(sock, [MAGIC, ns])
        ln = (await _read_n(reader, 1))[0]
        peer = await _read_n(reader, ln)
        nc = await _read_n(reader, NONCE)
        mac = await _read_n(reader, MAC)
        if not hmac.compare_digest(mac, _mac(token, b"c", ns, nc, peer)):
            await send_all(sock, [b"\x00"])
            raise AuthError(
                f"a client calling itself {peer.decode(errors='replace')!r} sent a bad token"
            )
        name = me.encode()[:255]
        await send_all(sock, [b"\x01", bytes([len(name)]), name, _mac(token, b"s", nc, ns, name)])
        return peer.decode()

    return await asyncio.wait_for(run(), timeout)


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
