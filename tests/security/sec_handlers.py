"""Function code for the security tests: what a curious or hostile function author would try."""

from __future__ import annotations

import os

from hearth.sdk import Event


def environ(event: Event) -> dict:
    """Everything the function can see of its environment, including the raw initial one."""
    with open("/proc/self/environ", "rb") as f:
        raw = f.read().decode("utf-8", "replace")
    return {"environ": dict(os.environ), "proc_environ": raw}


def size(event: Event) -> dict:
    return {"bytes": len(event.payload)}


def peek_alloc(event: Event) -> dict:
    """Allocate a buffer and report any bytes a previous owner left in it."""
    n = int(event.data().get("n", 1 << 16))
    buf = event.context.alloc(n)
    data = bytes(buf)
    return {"nonzero": sum(1 for b in data if b), "sample": data[:64].hex()}


def upper(event: Event) -> bytes:
    return bytes(event.payload).upper()


def chain_twice(event: Event) -> dict:
    """Chains the same event payload twice: both calls must see the original bytes."""
    original = bytes(event.payload)
    first = event.context.invoke("upper", event.payload)
    second = event.context.invoke("upper", event.payload)
    return {
        "original": original.decode(),
        "first": first.body.decode(),
        "second": second.body.decode(),
        "payload_after": bytes(event.payload).decode(),
    }


def chain_to(event: Event) -> dict:
    """Calls {"target", "token"?, "body"?} and reports the outcome (HandlerError -> its status)."""
    from hearth.sdk import HandlerError

    req = event.json()
    try:
        r = event.context.invoke(
            req["target"],
            req.get("body", "x").encode(),
            req.get("ctype", "application/octet-stream"),
            token=req.get("token"),
        )
        return {"status": r.status, "body": r.body.decode(errors="replace")}
    except HandlerError as e:
        return {"status": e.status, "error": str(e)}


def marker(event: Event) -> dict:
    """Appends a line to $MARKER_FILE for every call it serves."""
    with open(os.environ["MARKER_FILE"], "a") as f:
        f.write(bytes(event.payload).decode(errors="replace") + "\n")
    return {"ok": True}


def forge(event: Event) -> dict:
    """A hostile function: sends INVOKE descriptors straight to other endpoints, claiming to be
    the agent (src 1), with a payload of its own."""
    import gc

    from hearth.dataplane.descriptor import Descriptor, Kind, new_corr
    from hearth.dataplane.slots import payload_offset
    from hearth.runtime.codec import pack_meta

    # the runtime's own object (its module runs as __main__): what any handler can reach
    inst = next(
        o
        for o in gc.get_objects()
        if type(o).__name__ == "Instance" and hasattr(o, "ep") and hasattr(o, "pool")
    )
    sent = 0
    for eid in range(2, 40):
        if eid == inst.eid:
            continue
        meta = {"function": "victim", "content_type": "text/plain", "headers": {}}
        slot = inst.pool.alloc(4096)
        mb = pack_meta(meta)
        slot.buf[: len(mb)] = mb
        off = payload_offset(len(mb))
        slot.buf[off : off + 6] = b"FORGED"
        d = Descriptor(
            dst=eid,
            src=1,
            slot=slot.index,
            gen=slot.gen,
            length=6,
            meta_len=len(mb),
            kind=Kind.INVOKE,
            corr=new_corr(),
        )
        try:
            with inst.send_lock:
                inst.ep.send(d.stamp())  # Endpoint.send keeps the forged src
            sent += 1
        except Exception:
            pass
    return {"sent": sent}


def reply_then_exit(event: Event) -> dict:
    """M5: stop the agent (so it cannot read the reply yet), reply, and exit 3 s later: long
    enough for the reply to be sent on a loaded machine (the test waits for the exit)."""
    import signal
    import threading
    import time

    req = event.data()
    os.kill(int(req["agent"]), signal.SIGSTOP)
    with open(req["pid_file"], "w") as f:
        f.write(str(os.getpid()))
    threading.Thread(target=lambda: (time.sleep(3.0), os._exit(0)), daemon=True).start()
    return {"answer": 42}


def lend_slowly(event: Event) -> dict:
    """Lends its own request slot (its event's payload) to `slow-reader`."""
    r = event.context.invoke("slow-reader", event.payload)
    return {"status": r.status}


def slow_reader(event: Event) -> dict:
    """Reads its payload $READ_AFTER_S seconds into the call and appends it to $MARKER_FILE."""
    import time

    time.sleep(float(os.environ["READ_AFTER_S"]))
    with open(os.environ["MARKER_FILE"], "a") as f:
        f.write(bytes(event.payload).decode(errors="replace") + "\n")
    return {"ok": True}
