"""Physical references of the round benchmark: memory bandwidth and a bare socket's ingestion."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from fedavg.sizes import GB


class BandwidthProbe:
    """This machine's memory bandwidth, sampled between rounds: ``np.copyto`` of 256 MB between
    two buffers kept (pre-faulted) for the whole run. The bandwidth moves with what else runs
    (2.4x between two runs of this benchmark), so each round is compared with the samples
    taken right before and right after it, never with one figure from the start of the run."""

    def __init__(self, nbytes: int = 256 << 20, per_probe: int = 3):
        self.nbytes, self.per_probe = nbytes, per_probe
        self.a = np.ones(nbytes // 4, np.float32)
        self.b = np.empty_like(self.a)
        np.copyto(self.b, self.a)  # faults both in
        self.samples: list[float] = []  # GB/s, every sample of the run

    def probe(self) -> list[float]:
        """``per_probe`` samples now (GB/s); they are also kept in :attr:`samples`."""
        got = [
            self.nbytes / _timed(lambda: np.copyto(self.b, self.a)) / GB
            for _ in range(self.per_probe)
        ]
        self.samples.extend(got)
        return got

    def close(self) -> None:
        del self.a, self.b


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class BareSink:
    """The ingestion reference: the same client processes send the same update bytes to a bare
    loopback socket, read the way the round endpoint reads (``wire.tune``'s buffer sizes,
    ``wire.recv_chunks`` of ``roundingest.SCAN_CHUNK`` at a time, into pre-faulted memory), one
    thread per connection, timed like the endpoint's receive window (first bytes in -> last update
    complete). The endpoint has ``fan_in`` slots; this sink takes every sender at once."""

    def __init__(self, n: int, nbytes: int, buffers: int = 8):
        self.n, self.nbytes = n, nbytes
        self.bufs = [np.zeros(nbytes, np.uint8) for _ in range(min(n, buffers))]  # pre-faulted

    def run(self, start_senders) -> float:
        """GB/s of one transfer: ``start_senders(port)`` makes every client send once."""
        from hearth.functions.fedavg import wire
        from hearth.functions.fedavg.roundingest import SCAN_CHUNK

        srv = socket.create_server(("127.0.0.1", 0), backlog=self.n + 4)
        port = srv.getsockname()[1]
        spans: list[tuple[float, float, int]] = []
        lock = threading.Lock()

        def recv(c: socket.socket, buf: np.ndarray) -> None:
            wire.tune(c)
            first = []

            def mark(_done: int) -> None:
                if not first:
                    first.append(time.monotonic())

            # the endpoint's read loop (roundingest), less the check of each chunk
            got = wire.recv_chunks(c, memoryview(buf)[: self.nbytes], SCAN_CHUNK, mark)
            last = time.monotonic()
            c.sendall(b"k")
            c.close()
            with lock:
                spans.append((first[0] if first else last, last, got))

        threads = []
        start_senders(port)
        for i in range(self.n):
            c, _ = srv.accept()
            t = threading.Thread(target=recv, args=(c, self.bufs[i % len(self.bufs)]), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=120)
        srv.close()
        got = sum(g for _f, _l, g in spans)
        window = max(last for _f, last, _g in spans) - min(f for f, _l, _g in spans)
        return got / window / GB if window > 0 else 0.0
