"""A function's first call taken by a warm-pool instance, end to end (real node, zygote, data
plane): its spec and the request leave in one message (`DataplaneLink.hold`), and the call is
still answered as any first call is: the handler's reply, marked cold; the call's own timeout
counted from the ready report, so a slow first call is 504 on time (a held ready report once
broke exactly that); the cold-start record says the instance came from the pool."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

H = "hearth.functions.examples.handlers"


def _pool_ready(h) -> None:
    h.wait(lambda: h.client.status().get("warm_pool_ready", 0) >= 1, 60, "a pooled instance")


def _post(h, path: str, body: bytes) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        h.url + path, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _record(h, name: str) -> dict:
    got: dict = {}

    def seen() -> bool:
        recs = h.client.request("GET", "/v1/coldstarts", admin=True).json()["coldstarts"]
        got.update({r["function"]: r for r in recs})
        return name in got

    h.wait(seen, 30, f"the cold-start record of {name}")
    return got[name]


def test_a_first_call_from_the_pool_gets_its_handlers_reply(hearth_auto) -> None:
    h = hearth_auto
    h.deploy(name="pool-first-hello", handler=f"{H}:hello")
    _pool_ready(h)
    status, headers, body = _post(h, "/v1/functions/pool-first-hello:invoke", b'{"name": "pool"}')
    assert status == 200 and body["greeting"] == "hello, pool"
    assert headers["X-Hearth-Cold"] == "1"
    assert _record(h, "pool-first-hello")["from_pool"]


def test_a_slow_first_call_from_the_pool_times_out_on_time(hearth_auto) -> None:
    h = hearth_auto
    h.deploy(name="pool-first-slow", handler=f"{H}:sleep", timeout_s=10)
    _pool_ready(h)
    status, _, body = _post(
        h, "/v1/functions/pool-first-slow:invoke?timeout=0.5", json.dumps({"seconds": 5}).encode()
    )
    # 504, not the handler's 200 after 5 s (within its timeout_s of 10): the call's 0.5 s ran
    assert status == 504 and body["error"] == "timeout"
    assert _record(h, "pool-first-slow")["from_pool"]


def test_a_chained_first_call_from_the_pool_reaches_it_after_its_spec(hearth_auto) -> None:
    """A chained call (`ctx.invoke`) to a function with no instance: a pool instance is sent its
    spec (held for the call) and the call is forwarded to it. The forward once overtook the
    held spec: the pool instance read the request as its spec and died, the call got 502 and
    the instance was lost. Now the spec is read first: the callee's reply, from the pool."""
    h = hearth_auto
    h.deploy(name="pool-chain-echo", handler=f"{H}:echo")
    h.deploy(name="pool-chain-relay", handler=f"{H}:relay", min_instances=1)
    h.wait(lambda: any(i["state"] == "idle" for i in h.instances("pool-chain-relay")), 60, "relay")
    _pool_ready(h)
    req = urllib.request.Request(
        h.url + "/v1/functions/pool-chain-relay:invoke",
        data=b"hi-chain",
        method="POST",
        headers={"Content-Type": "text/plain", "x-relay-to": "pool-chain-echo"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    assert (status, body) == (200, b"hi-chain")
    assert _record(h, "pool-chain-echo")["from_pool"]
    (echo,) = h.instances("pool-chain-echo")  # the pool instance lives on as echo's
    assert echo["state"] in ("idle", "busy")
