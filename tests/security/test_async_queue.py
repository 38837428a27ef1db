"""M1 and M2: the async queue is bounded, and callbacks cannot reach internal addresses."""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import redis
from aiohttp import web
from hearth.client import ClientError
from hearth.localnode import start_node
from sec_helpers import TOKEN, deploy


@pytest.fixture(scope="module")
def qnode(redis_server, tmp_path_factory):
    redis.Redis.from_url(redis_server.url).delete("hearth:fn:slow:async")
    node = start_node(
        tmp_path_factory.mktemp("sec-queue"),
        redis_url=redis_server.url,
        token=TOKEN,
        dataplane="unix",
        env={"HEARTH_ASYNC_BACKLOG": "5", "HEARTH_RESULT_TTL_S": "120"},
    )
    node.client.deploy(
        {
            "name": "slow",
            "handler": "hearth.functions.examples.handlers:sleep",
            "max_instances": 1,
            "timeout_s": 30,
        }
    )
    deploy(node, "size", "size")
    yield node
    node.stop()


class Receiver:
    """A real HTTP server on loopback: /hook records calls, /jump redirects to /hook."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def hook(request: web.Request) -> web.Response:
            self.calls.append(request.path)
            return web.Response(text="ok")

        async def jump(request: web.Request) -> web.Response:
            self.calls.append(request.path)
            raise web.HTTPFound(f"{self.url}/hook")

        async def main() -> None:
            app = web.Application()
            app.router.add_route("*", "/hook", hook)  # a followed 302 arrives as GET
            app.router.add_post("/jump", jump)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            started.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()


def _wait_done(node, inv: str, timeout: float = 60) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rec = node.client.invocation(inv)
        if rec["status"] in ("succeeded", "failed") and rec.get("callback"):
            return rec
        time.sleep(0.1)
    raise AssertionError(f"invocation {inv} not finished: {rec}")


def test_async_backlog_is_capped_trimmed_and_results_expire(qnode, redis_server):
    body = msgpack.packb({"seconds": 0.3})
    accepted, refused = [], []
    for _ in range(20):
        try:
            accepted.append(
                qnode.client.invoke("slow", body, "application/msgpack", is_async=True).json()
            )
        except ClientError as e:
            refused.append(e)
    assert refused and all(e.status == 429 for e in refused)
    assert len(accepted) <= 7  # the cap (5) plus what started running meanwhile
    r = redis.Redis.from_url(redis_server.url)
    t0 = time.monotonic()
    while r.xlen("hearth:fn:slow:async") and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    assert r.xlen("hearth:fn:slow:async") == 0  # acked entries are deleted
    for a in accepted:
        rec = qnode.client.invocation(a["invocation_id"])
        assert rec["status"] == "succeeded"
        assert 0 < r.ttl(f"hearth:result:{a['invocation_id']}") <= 120  # HEARTH_RESULT_TTL_S


def test_callbacks_to_internal_addresses_are_refused_and_redirects_not_followed(qnode):
    rx = Receiver()
    port = rx.url.rsplit(":", 1)[1]
    targets = [
        f"{rx.url}/hook",  # loopback literal
        f"http://localhost:{port}/hook",  # a name that resolves to loopback
        f"http://[::ffff:127.0.0.1]:{port}/hook",  # loopback hidden in IPv6
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    ]
    for url in targets:
        inv = qnode.client.request(
            "POST",
            "/v1/functions/size:invoke?async=true&callback=" + url,
            b"x",
            content_type="application/octet-stream",
        ).json()["invocation_id"]
        rec = _wait_done(qnode, inv)
        assert rec["status"] == "succeeded"
        assert rec["callback"].startswith("failed:") and "internal" in rec["callback"], rec
    assert rx.calls == []


async def test_callback_redirects_are_not_followed(monkeypatch, redis_url):
    from hearth.queue import async_invoke
    from hearth.queue.callbacks import session

    monkeypatch.setenv("HEARTH_CALLBACK_ALLOW_NETS", "127.0.0.0/8")  # the receiver is loopback
    rx = Receiver()
    r = redis.asyncio.Redis.from_url(redis_url)
    async with session() as s:
        ok = await async_invoke.send_callback(
            s,
            r,
            "inv-1",
            {"callback": f"{rx.url}/jump"},
            "f",
            status="succeeded",
            http_status=200,
            body=b"{}",
            content_type="application/json",
            error=None,
            attempts=2,
            backoff_s=0.01,
        )
    await r.aclose()
    assert not ok
    assert rx.calls == ["/jump"]  # the redirect target was never called
