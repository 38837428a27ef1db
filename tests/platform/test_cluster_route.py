"""Where a node sends a call for a function hosted elsewhere (``Member.target``): a host with a
ready instance, by rendezvous hash among those, else among all live hosts that know the function.
The choice is remembered per host set, so it must follow every change of who is ready or live."""

from __future__ import annotations

from types import SimpleNamespace

from hearth.cluster.member import Member, MemberConfig
from hearth.cluster.peers import Peer
from hearth.gateway.front import rendezvous


def member() -> Member:
    cfg = MemberConfig(node="node-a", token=b"route-test-token-0123", http_url="http://a")
    return Member(SimpleNamespace(pool=None), None, cfg)


def peer(node: str, ready: int, deployed: bool = True, link: str = "h:1") -> Peer:
    return Peer(
        node, link, f"http://{node}", ready={"f": ready}, deployed=["f"] if deployed else []
    )


def test_the_route_follows_who_is_ready_and_live():
    m = member()
    m.plan = {"f": ("node-b", "node-c", "node-d")}
    m.peers = {
        "node-b": peer("node-b", 1),
        "node-c": peer("node-c", 0),
        "node-d": peer("node-d", 0),
    }
    assert m.target("f") == "node-b"  # the only one ready
    m.peers["node-b"] = peer("node-b", 0)
    m.peers["node-c"] = peer("node-c", 2)
    assert m.target("f") == "node-c"  # ready moved: not the remembered choice
    m.peers["node-b"] = peer("node-b", 1)
    assert m.target("f") == rendezvous("f", ["node-b", "node-c"])[0]
    for n in ("node-b", "node-c"):
        m.peers[n] = peer(n, 0)
    assert m.target("f") == rendezvous("f", ["node-b", "node-c", "node-d"])[0]  # none ready
    m.peers["node-d"] = peer("node-d", 0, deployed=False)  # not synced yet: would answer 404
    m.peers["node-c"] = peer("node-c", 0, link="")  # its link is off
    assert m.target("f") == "node-b"
    del m.peers["node-b"]  # gone: nowhere to send it, it runs here
    m.peers["node-c"] = peer("node-c", 0, link="")
    assert m.target("f") is None
    m.plan = {"f": ("node-a", "node-b")}
    assert m.target("f") is None  # hosted here


def test_the_remembered_routes_are_bounded():
    from hearth.cluster import member as mod

    m = member()
    m.plan = {f"f{i}": ("node-b",) for i in range(mod.ROUTE_CACHE + 10)}
    m.peers = {"node-b": Peer("node-b", "h:1", "http://b", deployed=list(m.plan))}
    for fn in m.plan:
        assert m.target(fn) == "node-b"
    assert len(m._routes) <= mod.ROUTE_CACHE
