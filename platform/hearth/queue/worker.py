"""A standalone trigger worker: one StreamTriggerRunner running a Python handler in this process.

    python -m hearth.queue.worker --redis URL --stream S --handler mod:fn [--function NAME]
                                   [--consumer NAME] [--claim-idle-s 30] [--max-deliveries 5]

Useful to consume a stream with local code outside a Hearth node, and used by the tests to kill
a real consumer process mid-event. SIGTERM/SIGINT stop it gracefully (in-flight work finishes)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from hearth.queue.consumer import StreamTriggerRunner
from hearth.queue.inproc import InProcessInvoker
from hearth.spec import StreamTrigger


async def run(args: argparse.Namespace) -> None:
    trig = StreamTrigger(
        stream=args.stream,
        group=args.group,
        max_deliveries=args.max_deliveries,
        claim_idle_s=args.claim_idle_s,
        backoff_s=args.backoff_s,
        max_inflight=args.max_inflight,
    )
    inv = InProcessInvoker({args.function: args.handler}, threaded=True)
    rn = StreamTriggerRunner(
        args.redis, args.function, trig, inv, args.consumer or f"worker-{os.getpid()}"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await rn.start()
    await rn.ready.wait()
    print(f"ready {rn.consumer}", flush=True)
    await stop.wait()
    await rn.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hearth.queue.worker", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--redis", default=os.environ.get("HEARTH_REDIS_URL"), help="default: $HEARTH_REDIS_URL"
    )
    ap.add_argument("--stream", required=True)
    ap.add_argument("--handler", required=True, help="module:callable")
    ap.add_argument("--function", default="worker")
    ap.add_argument("--group", default=None)
    ap.add_argument("--consumer", default=None)
    ap.add_argument("--claim-idle-s", type=float, default=30.0)
    ap.add_argument("--max-deliveries", type=int, default=5)
    ap.add_argument("--backoff-s", type=float, default=0.5)
    ap.add_argument("--max-inflight", type=int, default=64)
    args = ap.parse_args(argv)
    if not args.redis:
        print(
            "error: no Redis configured: pass --redis URL or set HEARTH_REDIS_URL", file=sys.stderr
        )
        return 1
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
