"""The front gateway's agent names (gateway/names.py): the pure record of lookups, and the shell's
promise that a call never waits on a lookup of a name it has an address for, that a hung lookup
is never doubled, and that a failed one keeps the last good addresses. The end-to-end check, a
real front whose network DNS falls silent under load, is tests/cluster/test_front_dns.py."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from hearth.gateway import names as names_mod
from hearth.gateway.front import Agents
from hearth.gateway.names import Names, NameState, needs_lookup, settle

A = (socket.AF_INET, "10.0.0.1")
B = (socket.AF_INET, "10.0.0.2")


def test_lookups_are_due_by_age_and_never_doubled():
    st = NameState()
    assert needs_lookup(st, 0.0, 2.0)  # never looked up
    st.pending_since = 0.0
    assert not needs_lookup(st, 100.0, 2.0)  # one in flight, however long: no second one
    settle(st, 1.0, [A, A, B])
    assert st.addrs == (A, B) and st.resolved_at == 1.0 and st.pending_since is None
    assert not needs_lookup(st, 2.9, 2.0) and needs_lookup(st, 3.0, 2.0)
    settle(st, 3.0, [], "Temporary failure in name resolution")
    assert st.addrs == (A, B)  # a failure keeps the last good answer
    assert st.failed_at == 3.0 and "Temporary" in st.error
    assert not needs_lookup(st, 4.0, 2.0) and needs_lookup(st, 5.0, 2.0)  # retried, not hammered
    settle(st, 5.0, [B])
    assert st.addrs == (B,) and st.error == ""  # a new answer replaces it (a moved node)


async def test_a_known_name_is_answered_at_once_while_its_lookup_hangs(monkeypatch):
    release = threading.Event()
    calls: list[str] = []
    real = names_mod._getaddrinfo

    def dns(host: str, port: int, family: int):
        calls.append(host)
        if host.startswith("hang"):
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, port, family)

    monkeypatch.setattr(names_mod, "_getaddrinfo", dns)
    n = Names(refresh_s=0.05, timeout_s=0.2)
    try:
        got = await n.lookup("localhost", 80)
        assert any(ip == "127.0.0.1" for _, ip in got)
        # a name that never resolved: waited for, at most timeout_s, then a resolver error
        with pytest.raises(socket.gaierror):
            await n.lookup("hang-1", 80)
        # its lookup still hangs: no second one is started, however often it is asked for
        for _ in range(5):
            with pytest.raises(socket.gaierror):
                await n.lookup("hang-1", 80)
            await asyncio.sleep(0.06)
        assert calls.count("hang-1") == 1
        # a known name whose refresh hangs keeps its last good addresses, answered at once
        key = ("localhost", 80, 0)
        n.names[key] = NameState(addrs=(A,), resolved_at=0.0)
        monkeypatch.setattr(names_mod, "_getaddrinfo", lambda *a: (release.wait(60), [])[1])
        n.timeout_s = 30.0  # a call that waited for the refresh would wait this long
        results = await asyncio.wait_for(
            asyncio.gather(*(n.lookup("localhost", 80) for _ in range(100))), 1.0
        )
        assert all(r == [A] for r in results)
        assert n.names[key].pending_since is not None  # its refresh is still running
        # what aiohttp's connector gets: numeric results, nothing to resolve again
        (r,) = await n.resolve("localhost", 80, socket.AF_UNSPEC)
        assert r["host"] == "10.0.0.1" and r["port"] == 80
    finally:
        release.set()


async def test_warm_resolves_every_agent_before_a_call_needs_it():
    n = Names(timeout_s=5.0)
    await n.warm([("localhost", 8080), ("127.0.0.1", 8081)])
    assert n.names[("localhost", 8080, 0)].addrs  # looked up before any call
    assert not any(k[0] == "127.0.0.1" for k in n.names)  # an IP is never looked up


async def test_dns_agents_are_resolved_off_the_loop_and_kept_through_failures(monkeypatch):
    agents = Agents("http://fixed:1, dns+http://localhost:9000")
    assert agents.current() == ["http://fixed:1"] and agents.dynamic
    n = Names(refresh_s=0.0, timeout_s=5.0)
    await agents.refresh(n)
    assert agents.current() == ["http://fixed:1", "http://127.0.0.1:9000"]

    def down(*_a):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(names_mod, "_getaddrinfo", down)
    for _ in range(3):
        await agents.refresh(n)
        await asyncio.sleep(0.01)
    assert agents.current() == ["http://fixed:1", "http://127.0.0.1:9000"]  # last good kept


async def test_a_name_that_cannot_be_looked_up_fails_at_once_and_is_retried():
    """A lookup that raises something else than OSError (IDNA: a label over 63 characters) ends
    like a failed one: its error is told at once, and the name is looked up again later (it was
    left 'in flight' for ever: every call waited `timeout_s`, then 'no answer')."""
    bad = "a" * 64 + ".example"
    n = Names(refresh_s=0.0, timeout_s=30.0)
    with pytest.raises(socket.gaierror, match="too long"):
        await asyncio.wait_for(n.lookup(bad, 80), 10.0)
    st = n.names[(bad, 80, 0)]
    assert st.pending_since is None and st.failed_at is not None


async def test_the_fronts_health_lists_the_agents_never_resolved(monkeypatch):
    """/healthz of the front names the agents whose names never resolved (a call to one waits
    for its lookup): what a deployment, and the cluster tests, wait on before sending work."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer
    from hearth.gateway.front import make_front

    real = names_mod._getaddrinfo
    dns_up = threading.Event()

    def lookup(host: str, port: int, family: int):
        if host == "late-agent" and not dns_up.is_set():
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real("localhost" if host == "late-agent" else host, port, family)

    monkeypatch.setattr(names_mod, "_getaddrinfo", lookup)
    agents = Agents("http://localhost:1,http://127.0.0.1:2,http://late-agent:3")
    front = TestServer(make_front(agents, connect_s=0.5))
    await front.start_server()
    try:
        async with ClientSession() as s:

            async def health() -> dict:
                async with s.get(str(front.make_url("/healthz"))) as r:
                    return await r.json()

            assert (await health())["unresolved"] == ["http://late-agent:3"]
            dns_up.set()  # the name answers at its next background lookup (every 2 s)
            for _ in range(100):
                if not (await health())["unresolved"]:
                    break
                await asyncio.sleep(0.1)
            assert (await health())["unresolved"] == []
    finally:
        await front.close()
