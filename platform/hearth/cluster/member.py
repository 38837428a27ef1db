"""One node agent as a member of a cluster: it announces itself (peer registry), keeps links to
its peers, serves their forwarded calls, follows the placement (computed by whichever agent
holds the leader lease, from the pure core in :mod:`hearth.controller.placement`), and forwards
invocations of functions hosted elsewhere.

It needs only a narrow view of the agent (:class:`Agent`): its slot pool, a local ``invoke``,
the deployed specs and which functions have ready instances.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hearth.agent.invoker import reply_fields
from hearth.cluster.landing import ReplySlot, SlotLanding
from hearth.cluster.link import LinkClient, LinkStats, NodeUnavailable, Reply
from hearth.cluster.peers import Peer, PeerRegistry, new_boot_id
from hearth.cluster.serve import LinkServer
from hearth.controller.model import Node
from hearth.controller.placement import assign_hosts
from hearth.dataplane.descriptor import NO_SLOT, Descriptor, Kind
from hearth.dataplane.shm import SlotPool
from hearth.dataplane.slots import payload_offset
from hearth.gateway.front import rendezvous
from hearth.invoke import InvokeError, InvokeResult
from hearth.runtime.codec import unpack_meta
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.cluster")

PLAN_KEY = "hearth:placement"
LEADER_KEY = "hearth:placement:leader"
DEAD_AFTER_MIN_S = 5.0
#: rendezvous choices remembered (a few per function; cleared when full)
ROUTE_CACHE = 4096


class Agent(Protocol):
    """What the cluster member needs from its node agent."""

    pool: SlotPool

    async def invoke(self, function: str, payload: Any, **kw: Any) -> InvokeResult: ...

    def start_call(self, function: str, payload: Any, **kw: Any) -> bool: ...

    def deployed(self) -> list[FunctionSpec]: ...

    def ready_counts(self) -> dict[str, int]: ...


@dataclass
class MemberConfig:
    node: str
    token: bytes
    http_url: str
    link_host: str = "127.0.0.1"
    link_port: int = 0
    advertise: str = ""  # host peers dial (default: link_host)
    heartbeat_s: float = 1.0
    peer_ttl_s: float = 3.0
    cpu_millicores: int = 4000
    memory_mb: int = 8192
    dataplane: str = "unknown"
    max_inflight: int = 256


def invoke_result(node: str, rep: Reply, t0: float) -> InvokeResult:
    """A forwarded invocation's Reply as the agent's result (its instance named by node); fields
    HTTP cannot carry raise the 502 `bad_reply` a local reply gets."""
    m = rep.meta
    status, ctype, headers, _t = reply_fields(m)
    return InvokeResult(
        status=status,
        body=rep.body,
        content_type=ctype,
        headers=headers,
        instance_id=f"{node}/{m.get('instance_id', '')}",
        cold=bool(m.get("cold")),
        invocation_id=m.get("invocation_id", ""),
        duration_s=time.monotonic() - t0,
    )


def reply_meta(
    status: int,
    content_type: str,
    headers: dict[str, str] | None,
    instance_id: str,
    cold: bool,
    invocation_id: str,
) -> dict[str, Any]:
    """A forwarded call's reply meta; the defaults (no headers, warm) are not sent."""
    m: dict[str, Any] = {
        "status": status,
        "content_type": content_type,
        "instance_id": instance_id,
        "invocation_id": invocation_id,
    }
    if headers:
        m["headers"] = headers
    if cold:
        m["cold"] = True
    return m


def _outcome(res: InvokeResult) -> tuple[dict[str, Any], Any]:
    """A forwarded call's result as what the link sends back: reply meta and body."""
    meta = reply_meta(
        res.status, res.content_type, res.headers, res.instance_id, res.cold, res.invocation_id
    )
    return meta, res.body


def stale_link(alive: bool, dialed_boot: str, peer: Peer | None) -> bool:
    """Whether a link to a peer is to be closed at a heartbeat: it failed on its own (a lost
    connection, or silence past its ``dead_after_s``), or the peer announces another boot than
    the one dialed (it restarted). Not when the peer's registration merely lapsed (``peer`` is
    None): a node whose heartbeat is late under load still answers its link, and closing it
    failed every call in flight there with 503 (a clean-clone run, 7 Dec 2026: 63 calls,
    "went away during the call (closed by us)"). A lapsed peer gets no new calls (routes need
    it live); a dead one's link fails by its own silence, a few seconds later."""
    if not alive:
        return True
    return peer is not None and bool(peer.boot) and bool(dialed_boot) and peer.boot != dialed_boot


class Member:
    def __init__(self, agent: Agent, redis: Any, cfg: MemberConfig):
        self.agent, self.r, self.cfg = agent, redis, cfg
        self.registry = PeerRegistry(redis, cfg.peer_ttl_s)
        self.boot = new_boot_id()
        self.stats = LinkStats()  # what this node sent and received over links, both roles
        self.server = LinkServer(
            cfg.node,
            cfg.token,
            self._serve,
            SlotLanding(agent.pool),
            host=cfg.link_host,
            port=cfg.link_port,
            max_inflight=cfg.max_inflight,
            stats=self.stats,
            starter=self._serve_now,
        )
        self.peers: dict[str, Peer] = {}
        self.plan: dict[str, tuple[str, ...]] = {}
        self.links: dict[str, LinkClient] = {}
        self._link_boots: dict[str, str] = {}  # node -> the boot id its link was dialed to
        self._dialing: dict[str, asyncio.Lock] = {}
        self._routes: dict[tuple[str, ...], str] = {}  # (function, *candidates) -> chosen host
        self._task: asyncio.Task | None = None
        # set by `close`: the heartbeat loop ends at its next turn even if its cancel is lost
        self._closing = False
        self.leader = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> Member:
        await self.server.start()
        await self.tick()
        self._task = asyncio.create_task(self._loop(), name="cluster-heartbeat")
        return self

    async def close(self) -> None:
        """Stop the heartbeat, leave the peer registry, close the links and the link server.
        The heartbeat is cancelled and also told to stop (`_closing`): a cancel that reaches a
        tick inside a Redis call can be dropped there (the tick then returns normally and the
        loop beat on), and this wait, with nothing to end it, held `hearth up`'s shutdown until
        it was killed: 30 s (`LocalNode.stop`) in 4 of 16 runs of test_multinode.py's
        vanishing-node test beside two CPU burners, 7 Dec 2026."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.registry.withdraw(self.cfg.node)
            if self.leader:
                await self.r.delete(LEADER_KEY)
        except Exception as e:
            log.info("could not withdraw from the peer registry: %s", e)
        await asyncio.gather(*(c.close() for c in self.links.values()), return_exceptions=True)
        await self.server.close()

    @property
    def link_address(self) -> str:
        host = self.cfg.advertise or self.cfg.link_host
        return f"{host}:{self.server.port}"

    async def _loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.cfg.heartbeat_s)
            if self._closing:
                break
            try:
                await self.tick()
            except Exception as e:  # Redis away for a moment: try again next beat
                log.warning("cluster heartbeat failed: %s", e)

    def me(self) -> Peer:
        return Peer(
            node=self.cfg.node,
            link=self.link_address,
            http=self.cfg.http_url,
            dataplane=self.cfg.dataplane,
            ready=self.agent.ready_counts(),
            deployed=sorted(spec.name for spec in self.agent.deployed()),
            cpu_millicores=self.cfg.cpu_millicores,
            memory_mb=self.cfg.memory_mb,
            free_cpu_millicores=self.cfg.cpu_millicores,
            free_memory_mb=self.cfg.memory_mb,
            boot=self.boot,
        )

    async def tick(self) -> None:
        """One heartbeat: announce, read the peers, (as leader) place, read the placement."""
        await self.registry.announce(self.me())
        peers = await self.registry.live()
        for name, link in list(self.links.items()):
            if stale_link(link.alive, self._link_boots.get(name, ""), peers.get(name)):
                self.links.pop(name, None)
                self._link_boots.pop(name, None)
                asyncio.create_task(link.close())
        self.peers = peers
        ttl = int(self.cfg.peer_ttl_s * 1000)
        if await self.r.set(LEADER_KEY, self.cfg.node, nx=True, px=ttl):
            self.leader = True
        else:
            cur = await self.r.get(LEADER_KEY)
            self.leader = (cur.decode() if isinstance(cur, bytes) else cur) == self.cfg.node
            if self.leader:
                await self.r.pexpire(LEADER_KEY, ttl)
        if self.leader:
            nodes = [Node(p.node, p.cpu_millicores, p.memory_mb) for p in peers.values()]
            plan = assign_hosts(nodes, self.agent.deployed(), self.plan)
            await self.r.set(PLAN_KEY, json.dumps({k: list(v) for k, v in plan.items()}))
        raw = await self.r.get(PLAN_KEY)
        self.plan = {k: tuple(v) for k, v in json.loads(raw).items()} if raw else {}

    # -- routing -----------------------------------------------------------------------------
    def hosts_here(self, function: str) -> bool:
        hosts = self.plan.get(function)
        return not hosts or self.cfg.node in hosts or not self._live_hosts(hosts)

    def _live_hosts(self, hosts: tuple[str, ...], function: str | None = None) -> list[str]:
        """Hosts that announce a link (and, given `function`, already know it: a node that has
        not synced a new deploy yet would answer 404)."""
        return [
            h
            for h in hosts
            if h in self.peers
            and self.peers[h].link
            and (function is None or function in self.peers[h].deployed)
        ]

    def target(self, function: str) -> str | None:
        """The node to forward ``function`` to, or None to run it here: here when this node
        hosts it (or nothing is planned, or no host is live); else a host with a ready instance,
        by rendezvous hash among those (or among all hosts when none is ready)."""
        hosts = self.plan.get(function)
        if not hosts or self.cfg.node in hosts:
            return None
        live = self._live_hosts(hosts, function)
        if not live:
            return None
        ready = [h for h in live if self.peers[h].ready.get(function)]
        key = (function, *(ready or live))
        node = self._routes.get(key)
        if node is None:  # a hash per candidate: worked out once per function and host set
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            node = self._routes[key] = rendezvous(function, ready or live)[0]
        return node

    async def link(self, node: str) -> LinkClient:
        c = self.links.get(node)
        if c is not None and c.alive:
            return c
        lock = self._dialing.setdefault(node, asyncio.Lock())
        async with lock:
            c = self.links.get(node)
            if c is not None and c.alive:
                return c
            p = self.peers.get(node)
            if p is None or not p.link:
                raise NodeUnavailable(node, "is not in the peer registry (down or never joined)")
            c = LinkClient(
                self.cfg.node,
                node,
                p.link,
                self.cfg.token,
                max_inflight=self.cfg.max_inflight,
                ping_s=self.cfg.heartbeat_s,
                # silence longer than a registration lives, and never under 5 s: a peer busy
                # copying a large payload on a loaded machine is slow to pong, not dead
                dead_after_s=max(self.cfg.peer_ttl_s, DEAD_AFTER_MIN_S),
                stats=self.stats,
            )
            await c.connect()
            self.links[node] = c
            self._link_boots[node] = p.boot
            return c

    async def forward(
        self,
        node: str,
        function: str,
        payload: Any,
        meta: dict[str, Any],
        timeout: float,
        sink: Any = None,
        sent: Callable[[], None] | None = None,
    ):
        """Send one invocation to ``node``; returns the link's Reply (raises InvokeError)."""
        link = self.links.get(node)
        if link is None or not link.alive:  # dial (once, under the node's lock)
            link = await self.link(node)
        return await link.call(function, meta, payload, timeout=timeout, sink=sink, sent=sent)

    async def forward_invoke(
        self,
        node: str,
        function: str,
        view: memoryview,
        meta: dict[str, Any],
        timeout: float,
        sent: Callable[[], None] | None = None,
    ) -> InvokeResult:
        t0 = time.monotonic()
        rep = await self.forward(node, function, view, meta, timeout, sent=sent)
        return invoke_result(node, rep, t0)

    def forward_now(
        self,
        node: str,
        function: str,
        view: memoryview,
        meta: dict[str, Any],
        timeout: float,
        done: Callable[[InvokeResult | InvokeError], None],
        sent: Callable[[], None] | None = None,
    ) -> bool:
        """``forward_invoke`` without a task (``LinkClient.start``): ``done`` gets the result
        or the error in the callback that settles the call. False, nothing sent, when the link
        is not up or would make it wait: then ``forward_invoke``."""
        link = self.links.get(node)
        if link is None or not link.alive:
            return False
        t0 = time.monotonic()

        def settled(rep: Reply | InvokeError) -> None:
            if not isinstance(rep, InvokeError):
                try:
                    rep = invoke_result(node, rep, t0)
                except InvokeError as e:  # the caller still gets its one answer
                    rep = e
            done(rep)

        return link.start(function, meta, view, timeout=timeout, done=settled, sent=sent)

    def reply_sink(self) -> Callable[[int, dict], tuple[memoryview, ReplySlot]]:
        def sink(n: int, meta: dict) -> tuple[memoryview, ReplySlot]:
            r = ReplySlot(self.agent.pool, meta, n)
            return r.view, r

        return sink

    # -- serving -----------------------------------------------------------------------------
    async def _serve(
        self, function: str, meta: dict[str, Any], payload: Any, timeout: float, reply: Any
    ) -> tuple[dict[str, Any], Any]:
        """A peer's forwarded call, run here (never forwarded again). Its reply leaves the
        moment the instance's reply descriptor is read (``reply``, straight from the reply
        slot); what is returned is sent only when that could not be done."""
        res = await self.agent.invoke(
            function,
            payload,
            content_type=meta.get("content_type") or "application/octet-stream",
            headers=meta.get("headers") or {},
            idempotency_key=meta.get("idempotency_key"),
            invocation_id=meta.get("invocation_id"),
            timeout=meta.get("exec_timeout"),  # None: the function's own
            forward=False,
            on_reply=self._early(reply),
        )
        return _outcome(res)

    def _serve_now(
        self,
        function: str,
        meta: dict[str, Any],
        payload: Any,
        timeout: float,
        reply: Any,
        done: Callable[[Any], None],
    ) -> bool:
        """``_serve`` without a task when an instance is free now (the agent's ``start_call``):
        the reply still leaves from the reply hook; ``done`` closes the books. False, nothing
        done, when the call would wait: ``_serve`` then serves it in a task."""

        def ended(res: InvokeResult | InvokeError) -> None:
            done(res if isinstance(res, InvokeError) else _outcome(res))

        return self.agent.start_call(
            function,
            payload,
            done=ended,
            content_type=meta.get("content_type") or "application/octet-stream",
            headers=meta.get("headers") or {},
            idempotency_key=meta.get("idempotency_key"),
            invocation_id=meta.get("invocation_id"),
            timeout=meta.get("exec_timeout"),
            forward=False,
            on_reply=self._early(reply),
        )

    def _early(self, reply: Any) -> Callable[[Descriptor, str, bool, str], None]:
        """The reply hook of a forwarded call: its reply leaves the moment the instance's reply
        descriptor is read (``reply``, straight from the reply slot)."""
        pool = self.agent.pool

        def early(d: Descriptor, instance_id: str, cold: bool, invocation_id: str) -> None:
            if d.kind != Kind.REPLY or d.slot == NO_SLOT:
                return  # errors take the agent's own path
            try:  # fields HTTP cannot carry: no early reply, the agent's end answers 502
                status, ctype, headers, _t = reply_fields(
                    unpack_meta(pool.view(d.slot, d.gen, d.meta_len))
                )
            except InvokeError:
                return
            rmeta = reply_meta(
                status,
                ctype,
                headers,
                instance_id,
                cold,
                invocation_id,
            )
            reply(rmeta, pool.view(d.slot, d.gen, d.length, offset=payload_offset(d.meta_len)))

        return early

    def status(self) -> dict[str, Any]:
        return {
            "node": self.cfg.node,
            "link": self.link_address,
            "leader": self.leader,
            "peers": sorted(self.peers),
            "placement": {k: list(v) for k, v in self.plan.items()},
            # where a call made here goes now (a planned host that has not announced the
            # function yet is not routed to: the call runs here until it does)
            "routes": {fn: self.target(fn) or self.cfg.node for fn in sorted(self.plan)},
            "links": {n: {"alive": c.alive, "closed": c.closed} for n, c in self.links.items()},
            "bytes": self.stats.to_dict(),
        }
