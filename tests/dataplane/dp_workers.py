"""Child-process bodies for the data-plane tests (module level so `spawn` can import them)."""

from __future__ import annotations

import os
import time

import numpy as np
from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.dataplane.endpoint import Endpoint
from hearth.dataplane.segment import proc_start
from hearth.dataplane.shm import SlotPool


def hold_slots(pool_name: str, n: int, nbytes: int, ready) -> None:
    """Allocate n slots, report them, then sleep until killed."""
    pool = SlotPool.attach(pool_name)
    slots = [pool.alloc(nbytes) for _ in range(n)]
    for s in slots:
        s.buf[:8] = b"childpid"
    ready.send([(s.index, s.gen) for s in slots])
    time.sleep(600)


def hand_over(pool_name: str, nbytes: int, ready) -> None:
    """Write a slot of its own and hand it to the pool's creator (as a reply is), then exit."""
    pool = SlotPool.attach(pool_name)
    s = pool.alloc(nbytes)
    s.buf[:8] = b"handover"
    pool.give_to_creator(s.index, s.gen)
    ready.send((s.index, s.gen, os.getpid(), proc_start(os.getpid())))


def create_pool_and_hang(pool_name: str, ready) -> None:
    SlotPool.create(pool_name, [(4096, 4)])
    ready.send(os.getpid())
    time.sleep(600)


def produce_array(
    proxy_path: str, pool_name: str, my_id: int, dst: int, n_floats: int, ready
) -> None:
    """Write an array into a slot once and send only its descriptor to ``dst``."""
    pool = SlotPool.attach(pool_name)
    ep = Endpoint.register(proxy_path, my_id)
    ready.send("registered")
    ready.recv()  # wait until the consumer is registered too
    slot = pool.alloc(n_floats * 4)
    arr = np.frombuffer(slot.buf, dtype=np.float32, count=n_floats)
    arr[:] = np.arange(n_floats, dtype=np.float32)
    ep.send(slot.descriptor(dst=dst, src=my_id, kind=Kind.INVOKE).stamp())
    reply = ep.recv(timeout=30)  # consumer replies after adopting/reading
    ready.send((reply.kind, reply.aux, float(arr[-1])))
    ep.close()
    pool.close()


def echo_server(proxy_path: str, my_id: int, count: int, ready) -> None:
    """Answer PING with PONG (same aux/corr) ``count`` times."""
    ep = Endpoint.register(proxy_path, my_id)
    ready.send("registered")
    for _ in range(count):
        d = ep.recv(timeout=30)
        ep.send(d.reply(kind=Kind.PONG))
    ready.send("done")
    time.sleep(600)


def register_and_hang(proxy_path: str, my_id: int, ready) -> None:
    Endpoint.register(proxy_path, my_id)
    ready.send("registered")
    time.sleep(600)


def alloc_churn(pool_name: str, rounds: int, out) -> None:
    """Allocate, stamp with our pid, verify nobody else got the same slot, release."""
    pool = SlotPool.attach(pool_name)
    pid = os.getpid().to_bytes(4, "little")
    bad = 0
    for _ in range(rounds):
        s = pool.alloc(100)
        s.buf[:4] = pid
        time.sleep(0)
        if bytes(s.buf[:4]) != pid:
            bad += 1
        pool.release(s.index, s.gen)
    out.send(bad)
    pool.close()


def send_burst(proxy_path: str, my_id: int, dst: int, n: int, ready) -> None:
    ep = Endpoint.register(proxy_path, my_id)
    ready.send("registered")
    ready.recv()
    for i in range(n):
        ep.send(Descriptor(dst=dst, src=my_id, aux=i, length=i, kind=Kind.EVENT))
    ready.send("sent")
    ready.recv()
    ep.close()


def chain_hop(proxy_path: str, pool_name: str, my_id: int, next_id: int | None, ready) -> None:
    """A function in a chain: adopt the slot; forward the same descriptor, or (last) sum,
    stamp a marker into the payload and reply to the original sender."""
    import numpy as np

    pool = SlotPool.attach(pool_name)
    ep = Endpoint.register(proxy_path, my_id)
    ready.send("registered")
    d = ep.recv(timeout=30)
    pool.adopt(d.slot, d.gen)
    arr = np.frombuffer(pool.payload(d), np.float32)
    if next_id is not None:
        fwd = Descriptor.unpack(d.pack())
        fwd.dst, fwd.aux = next_id, d.src  # aux carries the chain's origin
        fwd.src = my_id
        ep.send(fwd)
        ready.send(
            (
                "forwarded",
                arr.ctypes.data - np.frombuffer(pool.slot(d.slot, d.gen).buf, np.uint8).ctypes.data,
            )
        )
    else:
        total = float(arr.sum(dtype=np.float64))
        arr[0] = -42.0  # marker the origin must see in its own mapping
        ep.send(d.reply(dst=d.aux, slot=d.slot, gen=d.gen, length=d.length, meta_len=d.meta_len))
        ready.send(("summed", total))
    ready.recv()
    ep.close()
