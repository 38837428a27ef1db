"""The round benchmark's server process: a :class:`RoundServer` on its own slot pool.

It answers the coordinator's pipe: ``("wait", rnd)`` -> the round's stats and the slots still
held; ``("stop",)`` -> its peak RSS, the pool's slots in use after close and its thread count.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import numpy as np

from fedavg.flower_app import app_module
from fedavg.procfs import status_kb


def server_proc(
    conn, n: int, params: int, app_dir: str, fan_in: int, token: str, handover: bool = False
) -> None:
    """The server (a spawned process): ``fan_in + 3`` slots of one update each, kernels warmed
    and the heap kept before round 1; reports ``("ready", address, rss_base, pid)``."""
    from hearth.dataplane.shm import SlotPool
    from hearth.dataplane.slots import TRIM_OFF
    from hearth.functions.fedavg.foldkernels import warm_kernels
    from hearth.functions.fedavg.pack import Header, LayerSpec, Layout, packed_size
    from hearth.functions.fedavg.roundserver import RoundServer, keep_heap

    keep_heap()
    m = app_module(Path(app_dir))
    warm_kernels()
    rss_base = status_kb("self", "VmRSS") * 1024
    shapes = m.layer_sizes(params)
    f32 = np.dtype(np.float32)
    layout = Layout(tuple(LayerSpec(str(i), f32, (s,)) for i, s in enumerate(shapes)))
    max_bytes = packed_size(Header("update", 2**40, layout, 2**40, "c" * 64))
    slot = -(-max_bytes // (1 << 21)) * (1 << 21)
    pool = SlotPool.create(
        f"hearth-bench-{uuid.uuid4().hex[:8]}", [(slot, fan_in + 3)], trim_threshold=TRIM_OFF
    )
    init = [(str(i), np.zeros(s, np.float32)) for i, s in enumerate(shapes)]
    srv = RoundServer(
        n,
        pool=pool,
        token=token,
        max_update_bytes=max_bytes,
        fan_in=fan_in,
        initial=init,
        handover=handover,
    )
    del init
    srv.start()
    conn.send(("ready", srv.address, rss_base, os.getpid()))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "wait":
                st = srv.wait_round(msg[1], timeout=600)
                conn.send(("round", st.to_dict(), srv.slots_held()))
            elif msg[0] == "stop":
                break
    finally:
        hwm = status_kb("self", "VmHWM") * 1024
        srv.close()
        used = pool.stats()["used"]
        pool.destroy()
        conn.send(("stopped", hwm, used, threading.active_count()))
