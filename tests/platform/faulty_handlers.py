"""Function code of a faulty instance (tests/platform/test_start_call.py): it reaches into its
own runtime, as code running in an instance can, to send what an honest runtime never does."""

from __future__ import annotations

from hearth.dataplane.descriptor import Descriptor, Kind
from hearth.sdk import Event


def second_reply(event: Event) -> bytes:
    """Answers b"first" (in its request slot), then sends a second reply with the same key in
    a slot of its own, handed to the agent as every reply slot is, and writes that slot's
    index and generation to the file named by the payload."""
    rt = event.context._emit.__self__  # the instance's runtime (`hearth.runtime.replies.Wire`)
    send, send_reply, path = rt.send, rt.send_reply, bytes(event.payload).decode()

    def again(agent: int, corr: bytes) -> None:
        s = rt.pool.alloc(64)
        s.buf[:6] = b"second"
        send(Descriptor(dst=agent, kind=Kind.REPLY, slot=s.index, gen=s.gen, length=6, corr=corr))
        with open(path + ".tmp", "w") as f:
            f.write(f"{s.index} {s.gen}")
        import os

        os.replace(path + ".tmp", path)

    def send_then_again(d: Descriptor, agents: bool = False) -> None:
        send(d, agents)
        if d.kind != Kind.REPLY:
            return
        rt.send, rt.send_reply = send, send_reply  # (once)
        again(d.dst, d.corr)

    def reply_then_again(d: Descriptor, *reply: int) -> None:
        """The warm reply in the request slot (`Wire.send_reply`, which skips `send`)."""
        rt.send, rt.send_reply = send, send_reply  # (once; before: it may call rt.send)
        send_reply(d, *reply)
        again(d.src, d.corr)

    rt.send, rt.send_reply = send_then_again, reply_then_again
    return b"first"
