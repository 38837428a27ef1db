"""Where the kernel runs a process woken by a socket message, and what that costs: a sleeper
blocked on a SOCK_SEQPACKET pair is woken after 0.2 s idle, 40 times; the waker then does N
loop iterations of its own work before blocking. Prints the wake-up (send -> the sleeper's
first line) and the send's own time, p50.

    python scripts/wake_placement.py free|pin|other N

free: the kernel places it; pin: on the waker's vCPU; other: on the other vCPU (2 vCPUs).
The journal's "Fifteenth stop" entry: on this machine kind the woken process runs on the
waker's vCPU once the waker blocks; a halted other vCPU takes ~155 us to wake."""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("how", choices=("free", "pin", "other"), help="where the sleeper runs")
    ap.add_argument("work", type=int, help="loop iterations the waker runs after its send")
    a = ap.parse_args()
    how, work = a.how, a.work
    if how != "free" and len(os.sched_getaffinity(0)) < 2:
        ap.error(f"{how!r} needs two CPUs to choose from")
    libc = ctypes.CDLL(None)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            m = b.recv(64)
            t = time.perf_counter()
            if m == b"q":
                os._exit(0)
            b.send(repr(t).encode())
    b.close()
    wake, send = [], []
    try:
        for _ in range(40):
            time.sleep(0.2)
            if how in ("pin", "other"):
                cpu = libc.sched_getcpu()
                os.sched_setaffinity(pid, {1 - cpu} if how == "other" else {cpu})
            t0 = time.perf_counter()
            a.send(b"go")
            t1 = time.perf_counter()
            x = 0
            for j in range(work):  # the waker's own work after its send
                x += j
            t = float(a.recv(64))
            wake.append((t - t0) * 1e6)
            send.append((t1 - t0) * 1e6)
            os.sched_setaffinity(pid, os.sched_getaffinity(0))
    finally:
        a.send(b"q")
        os.waitpid(pid, 0)
    print(
        f"{how} N={work}: wake p50 {statistics.median(wake):.1f} us, send p50 {statistics.median(send):.1f} us"
    )


if __name__ == "__main__":
    main()
