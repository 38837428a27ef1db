"""What the node gateway buffers for a client that pipelines invokes and never reads its answers
while the node sheds (#16): the fast path answers each shed invoke 503 from the read itself, and
a 503 is several times the size of the smallest invoke, so a connection must stop being served
(and then read) once its answers back up, not write a refusal for every request it has read.

A real client socket on loopback (a small receive buffer, so the kernel holds little of what
the gateway writes) against the node gateway as `hearth up` serves it (`gateway_in_process`:
`make_app`, `listen`), with the loop-lag state held behind so every invoke is shed. The bytes
the gateway holds for the connection (its read buffer plus the transport's unsent answers) are
sampled while the client sends."""

from __future__ import annotations

import asyncio
import socket
import time

from gateway_in_process import gateway_in_process

#: the smallest invoke the fast path takes (no body): about 60 bytes, against a ~250-byte 503
ASK = b"POST /v1/functions/f:invoke HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
SEND_S = 3.0  # the client pipelines for this long (or until it has sent SEND_MAX)
SEND_MAX = 4 << 20
READ_MAX = 256 * 1024  # what asyncio's socket transport reads at most at once


def hold_shedding(app) -> None:
    """Every invoke shed from now on: the lag state marked behind for good, its timer stopped
    (as benchmarks/refusal_cost.py holds it)."""
    from hearth.gateway.shed import LOOP_LAG

    lag = app[LOOP_LAG]
    lag.stop()
    st = lag.state
    st.due, st.behind_since, st.late_ticks = -1e9, -1e9, 10**6


async def test_a_client_that_never_reads_cannot_make_the_gateway_buffer_its_refusals(
    tmp_path, redis_url
):
    from hearth.gateway.fastpath import PIPELINE_MAX
    from hearth.gateway.shed import LOOP_LAG
    from hearth.gateway.sojourn import TAP

    taps = []

    def keep_taps(app) -> None:
        tap = app[TAP]
        app[TAP] = lambda inner, stamps: taps.append(tap(inner, stamps)) or taps[-1]

    loop = asyncio.get_running_loop()
    async with gateway_in_process(
        tmp_path, redis_url, app_kw={"shed_lag_s": 0.02}, before_serving=keep_taps
    ) as gw:
        hold_shedding(gw.app)
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        c.setblocking(False)
        await loop.sock_connect(c, ("127.0.0.1", gw.port))
        while not taps or taps[0]._t is None:
            await asyncio.sleep(0.01)
        tap = taps[0]
        t = tap._t
        high = t.get_write_buffer_limits()[1]
        peaks = [0]
        write = t.write

        def counted_write(data) -> None:  # the transport's unsent bytes after every answer
            write(data)
            peaks[0] = max(peaks[0], t.get_write_buffer_size())

        t.write = counted_write
        chunk = ASK * 1000
        sent, held = 0, 0
        deadline = time.monotonic() + SEND_S
        while time.monotonic() < deadline and sent < SEND_MAX:
            try:
                sent += c.send(chunk)
            except BlockingIOError:
                pass  # the gateway stopped reading: its side is full
            await asyncio.sleep(0.005)  # the gateway reads and answers
            held = max(held, len(tap._buf) + t.get_write_buffer_size())
        # the client reads again: every whole invoke it sent is answered 503, none lost
        asked, got, n, tail = sent // len(ASK), 0, 0, b""
        deadline = time.monotonic() + 60
        while got < asked and time.monotonic() < deadline:
            data = await asyncio.wait_for(loop.sock_recv(c, 1 << 20), 30)
            if not data:
                break
            seen, tail = tail + data, (tail + data)[-12:]  # a status line split between reads
            n += seen.count(b"HTTP/1.1 503 ")  # 13 bytes: never wholly in the 12 kept
            got += seen.count(b"HTTP/1.1 ") - tail.count(b"HTTP/1.1 ")  # counted next time
        shed = gw.app[LOOP_LAG].state.shed
        c.close()
    peak_out = peaks[0]
    print(
        f"sent {sent} B ({sent // len(ASK)} invokes), shed {shed}, peak held {held} B, "
        f"peak unsent answers {peak_out} B (high-water {high} B)"
    )
    assert sent > 4 * PIPELINE_MAX  # the client did pipeline far past what is served at once
    assert shed > 0
    assert peak_out <= high + 1024, (peak_out, high, sent)
    assert held <= high + 1024 + PIPELINE_MAX + READ_MAX, (held, sent)
    assert n == got == asked == shed, (n, got, asked, shed)
