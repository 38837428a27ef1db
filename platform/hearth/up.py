"""`hearth up`: one node of Hearth in the foreground — Redis (private unless configured), the
per-node proxy daemon (eBPF or AF_UNIX), the shared-memory slot pool, the node agent, queue
triggers and the HTTP gateway. Everything is torn down on stop; nothing listens beyond loopback
unless HEARTH_HOST says so."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from hearth.config import Settings, http_url, write_private
from hearth.dataplane.segment import cleanup_stale_segments
from hearth.dataplane.shm import SlotPool
from hearth.gateway.app import make_app
from hearth.gateway.heap import GcPauses
from hearth.gateway.sojourn import listen
from hearth.node import NodeAgent
from hearth.process import (
    StartupError,
    cannot_listen,
    collect_heap,
    freeze_heap,
    raise_fd_limit,
    until_signal,
)
from hearth.redis_server import RedisServer, RedisUnavailable
from hearth.registry import Registry
from hearth.spec import FunctionSpec

log = logging.getLogger("hearth.up")
COLDSTART_KEY = "hearth:coldstarts"


class Platform:
    def __init__(
        self,
        settings: Settings,
        *,
        warm_pool_size: int = 0,
        deploy: list[FunctionSpec] | None = None,
    ):
        self.settings = settings
        self.warm_pool_size = warm_pool_size
        self.initial = deploy or []
        self.redis_server: RedisServer | None = None
        self.proxy: subprocess.Popen | None = None
        self.pool: SlotPool | None = None
        self.agent: NodeAgent | None = None
        self.redis: aioredis.Redis | None = None
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.queue: Any = None
        self.admin_token = ""
        self.token_created = False
        self.redis_url = ""
        self._sync: asyncio.Task | None = None
        self._registered: set[str] = set()
        self.registry: Registry | None = None  # the one the admin API and the sync share
        self.member: Any = None
        self.max_joined = settings.max_joined  # join connections at once (fits the fd limit)
        self.join_bound_by = "HEARTH_MAX_JOINED"  # or the fd limit that lowered it

    @property
    def pods(self) -> bool:
        """Its instances are pods that join it (HEARTH_INSTANCES=pods, Kubernetes)."""
        return os.environ.get("HEARTH_INSTANCES") == "pods"

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    async def start(self) -> Platform:
        """Start every part; if any fails, stop the ones already running (no orphan Redis)."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Platform:
        marks = [("begin", time.monotonic())]  # phase times, logged once serving (restart time)
        run = self._prepare_state()
        await self._start_redis()
        marks.append(("redis", time.monotonic()))
        sock_dir, sock = await self._start_proxy(run)
        marks.append(("proxy", time.monotonic()))
        await self._start_agent(sock_dir, sock)
        marks.append(("agent", time.monotonic()))
        await self._start_queues(sock)
        marks.append(("queues", time.monotonic()))
        await self._start_gateway()
        marks.append(("gateway", time.monotonic()))
        log.info(
            "serving after %.2fs (%s)",
            marks[-1][1] - marks[0][1],
            ", ".join(f"{n} {t - marks[i][1]:.2f}s" for i, (n, t) in enumerate(marks[1:])),
        )
        return self

    def _prepare_state(self) -> Path:
        """The state directory (owner-only), the admin token, no stale segments; its run/ dir."""
        s = self.settings
        # or StartupError: too few descriptors for the join connections of a pods-only node
        plan = raise_fd_limit(s.max_joined, self.pods)
        self.max_joined = s.max_joined if plan.max_joined is None else plan.max_joined
        self.join_bound_by = plan.bound_by
        s.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(s.state, 0o700)  # mkdir's mode does not apply to a directory that exists
        run = s.state / "run"
        run.mkdir(exist_ok=True, mode=0o700)
        self.admin_token, self.token_created = s.ensure_admin_token()
        cleanup_stale_segments()
        return run

    async def _start_redis(self) -> None:
        """1. Redis: HEARTH_REDIS_URL's, else a private redis-server of this node's own."""
        s = self.settings
        if s.redis_url:
            self.redis_url = s.redis_url
        else:
            try:
                self.redis_server = RedisServer(
                    s.state / "redis", persist=True, private=True
                ).start()
            except RedisUnavailable as e:
                raise StartupError(str(e)) from None
            self.redis_url = self.redis_server.url
        self.redis = aioredis.Redis.from_url(self.redis_url)
        try:
            await self.redis.ping()
        except Exception as e:
            raise StartupError(f"cannot reach Redis at {self.redis_url}: {e}") from None
        write_private(s.state / "redis-url", self.redis_url)  # for `hearth queues`, `dlq`, …

    async def _start_proxy(self, run: Path) -> tuple[Path, Path]:
        """2. The proxy daemon (separate process: it can restart without taking the node down).
        With HEARTH_NODE_SOCKET_DIR (a node agent on Kubernetes) the proxy and join sockets
        live there: instance pods mount that directory at the same path."""
        s = self.settings
        sock_dir = Path(os.environ.get("HEARTH_NODE_SOCKET_DIR") or run)
        sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = sock_dir / f"proxy-{s.port}.sock"
        proxy_log = open(run / f"proxy-{s.port}.log", "ab")  # noqa: SIM115
        self.proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hearth.proxies.daemon",
                "--socket",
                str(sock),
                "--mode",
                s.dataplane_mode,
                "--parent-pid",  # the daemon exits with this node: no orphans after a kill -9
                str(os.getpid()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=proxy_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proxy_log.close()  # the daemon has its own copy
        await self._wait_for(sock, self.proxy, "proxy daemon", run / f"proxy-{s.port}.log")
        return sock_dir, sock

    async def _start_agent(self, sock_dir: Path, sock: Path) -> None:
        """3. The slot pool and the node agent, serving what the registry lists."""
        s = self.settings
        self.pool = SlotPool.create(s.pool_name or f"hearth-{s.node}-{s.port}", s.pool_class_list())
        self.agent = NodeAgent(
            self.pool,
            str(sock),
            node=s.node,
            redis_url=self.redis_url,
            log_dir=s.state / "logs",
            warm_pool_size=self.warm_pool_size,
            on_cold_start=self._record_cold_start,
            nodes=s.node_list() or None,
            runner_kind=s.runner,
            zygote_preload=[m.strip() for m in s.zygote_preload.split(",") if m.strip()],
            zygote_wait_s=s.zygote_wait_s,
            zygote_wait_max_s=s.zygote_wait_max_s,
            zygote_fork_timeout_s=s.zygote_fork_timeout_s,
            zygote_retry_s=s.zygote_retry_s,
            policies=s.keepalive_policies(),
            max_queue_wait_s=s.max_queue_wait_s,
            spin=s.spin_config(),
            start_timeout_s=s.start_timeout_s,
        )
        from hearth.agent.join import JOIN_SOCKET, JoinRunner, JoinServer

        # instance pods join here (hearth.runtime.pod); harmless where none do
        self.join = JoinServer(
            self.agent, str(sock_dir / JOIN_SOCKET), self.max_joined, self.join_bound_by
        )
        if self.pods:
            # Kubernetes: instances are the controller's pods; this agent starts none itself
            wait_s = float(os.environ.get("HEARTH_POD_JOIN_TIMEOUT", "60"))
            runner = JoinRunner(self.agent.link, self.join, wait_s)
            self.agent.runner = self.agent.lifecycle.runner = runner
            # Pool pods are the controller's too (controller.warmPool): an agent-side warm pool
            # would only keep a start waiting for a pool pod nobody makes, failing every
            # HEARTH_POD_JOIN_TIMEOUT. Pool pods that join are still pooled and specialised.
            self.agent.lifecycle.warm_pool_size = 0
        await self.agent.start()
        await self.join.start()
        registry = self.registry = Registry(self.redis)
        for spec in self.initial:
            await registry.put(spec)
        for spec in await registry.all():
            await self.agent.deploy(spec)
            self._registered.add(spec.name)

    async def _start_queues(self, sock: Path) -> None:
        """4. Queue triggers and async invocations, and their figures on /metrics."""
        s = self.settings
        from hearth.triggers import QueueService

        self.queue = QueueService(
            self.redis_url,
            self.agent,
            node=s.node,
            result_ttl=s.result_ttl_s,
            max_backlog=s.async_backlog,
        )
        import redis as sync_redis

        from hearth.queue.stats import register_queue_metrics

        # Queue figures on /metrics (read from Redis at scrape time, off the event loop).
        self._metrics_redis = sync_redis.Redis.from_url(self.redis_url, socket_timeout=5)
        # Only the triggers Hearth knows (no keyspace SCAN per scrape), at most every 2 s.
        register_queue_metrics(
            self.agent.metrics.registry, self._metrics_redis, scan=False, min_interval_s=2.0
        )
        from hearth.metrics import DataplaneCollector

        agent = self.agent
        self.agent.metrics.registry.register(DataplaneCollector(str(sock), agent.table.function_of))
        await self.queue.start([fs.spec for fs in self.agent.functions.values()])

    async def _start_gateway(self) -> None:
        """5. The HTTP gateway (and the registry sync, the cluster membership)."""
        s = self.settings
        app = make_app(
            self.agent,
            self.registry,
            admin_token=self.admin_token,
            max_body_bytes=s.max_body_bytes,
            metrics_token=s.metrics_token,
            body_limits=s.body_limits(),
            shed_lag_s=s.shed_loop_lag_s,
            hooks={**self.queue.gateway_hooks(), "coldstarts": self._cold_starts},
        )
        self._sync = asyncio.create_task(self._sync_loop())
        if s.cluster_token:
            await self._join_cluster()
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=s.idle_s
        )
        await self.runner.setup()
        # a deep accept queue: past aiohttp's 128 the kernel drops SYNs, and a client's
        # retransmit waits 1 s, 3 s, 7 s... (seconds of queueing no admission rule can see);
        # every read is stamped, so the wait bound counts from there (gateway.sojourn)
        try:
            self.server = await listen(self.runner, s.host, s.port, backlog=4096)
        except OSError as e:
            raise cannot_listen(s.host, s.port, e) from None

    async def _join_cluster(self) -> None:
        """Announce this node to its peers and open the agent-to-agent link."""
        from hearth.cluster.member import Member, MemberConfig

        s = self.settings
        assert self.agent is not None and self.redis is not None and s.cluster_token
        advertise = s.advertise or (s.host if s.host not in ("0.0.0.0", "::") else s.link_host)
        node = self.agent.nodes[0]
        self.member = Member(
            self.agent,
            self.redis,
            MemberConfig(
                node=s.node,
                token=s.cluster_token.encode(),
                http_url=http_url(advertise, s.port),
                link_host=s.link_host,
                link_port=s.link_port,
                advertise=s.advertise or "",
                heartbeat_s=s.heartbeat_s,
                peer_ttl_s=3 * s.heartbeat_s,
                cpu_millicores=node.cpu_millicores,
                memory_mb=node.memory_mb,
                dataplane=self.agent.mode,
            ),
        )
        try:
            await self.member.start()
        except OSError as e:
            raise StartupError(
                f"cannot open the cluster link on {s.link_host}:{s.link_port}: {e.strerror}"
            ) from None
        self.agent.join(self.member)
        from hearth.cluster.stats import LinkCollector

        self.agent.metrics.registry.register(LinkCollector(self.member.stats))

    async def _wait_for(
        self, sock: Path, proc: subprocess.Popen, what: str, logf: Path, timeout: float = 30
    ) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                tail = logf.read_text(errors="replace")[-800:] if logf.exists() else ""
                raise StartupError(f"{what} exited with code {proc.returncode}:\n{tail}")
            # ready when *our* daemon answers: a restarted node (a container killed and started
            # again) finds the dead daemon's socket file there first
            if sock.exists() and await asyncio.to_thread(_serves, sock, proc.pid):
                return
            await asyncio.sleep(0.05)
        raise StartupError(f"{what} did not start within {timeout}s (see {logf})")

    async def sync_registry(self) -> None:
        """Follow the shared registry, so every node agent serves what any of them deployed."""
        assert self.registry is not None and self.agent is not None and self.queue is not None
        reg = self.registry
        gen = reg.generation
        want = {s.name: s for s in await reg.all()}
        # Each step holds off the admin API (`Registry.sync_step`) and first checks that it
        # changed nothing since the read; if it did, the rest waits for the next round, which
        # reads again. Only what the registry once listed is removed when it disappears from
        # it; functions started directly through the backend protocol are the controller's.
        for name in [n for n in self._registered if n not in want]:
            async with reg.sync_step(gen) as fresh:
                if not fresh:
                    return
                self._registered.discard(name)
                await self.queue.remove(name)  # its triggers even if the agent has let it go
                if name in self.agent.functions:
                    log.info("registry sync: %s is gone from the registry: undeploying", name)
                    await self.agent.undeploy(name)
        for name, spec in want.items():
            async with reg.sync_step(gen) as fresh:
                if not fresh:
                    return
                self._registered.add(name)
                have = self.agent.functions.get(name)
                if have is None or have.spec != spec:
                    log.info(
                        "registry sync: deploying %s (%s)",
                        name,
                        "new" if have is None else "changed",
                    )
                    await self.agent.deploy(spec)
                    await self.queue.add(spec)

    async def publish_load(self, ttl_s: int = 10) -> None:
        """This node's per-function load for the controller's autoscaler (in flight, held, and
        its stream triggers' lag and pending entries: `hearth.agent.loadpub`)."""
        assert self.redis is not None and self.agent is not None and self.queue is not None
        from hearth.agent.loadpub import publish

        await publish(
            self.redis,
            self.settings.node,
            self.agent.functions,
            self.queue.triggers(),
            ttl_s,
        )

    async def _sync_loop(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.sync_registry()
                await self.publish_load()
            except Exception as e:  # Redis away for a moment: try again next round
                log.warning("registry sync failed: %s", e)

    def _record_cold_start(self, rec: dict[str, Any]) -> None:
        if self.redis is not None:
            asyncio.get_running_loop().create_task(self._push_cold_start(rec))

    async def _push_cold_start(self, rec: dict[str, Any]) -> None:
        assert self.redis is not None
        await self.redis.rpush(COLDSTART_KEY, json.dumps(rec))
        await self.redis.ltrim(COLDSTART_KEY, -100_000, -1)

    async def _cold_starts(self) -> list[dict[str, Any]]:
        assert self.redis is not None
        return [json.loads(x) for x in await self.redis.lrange(COLDSTART_KEY, 0, -1)]

    async def stop(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            self._sync = None
        if self.server is not None:
            self.server.close()  # no new connections; the runner drains the open ones
            self.server = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.queue is not None:
            await self.queue.stop()
            self.queue = None
        if self.member is not None:
            if self.agent is not None:
                self.agent.leave()
            await self.member.close()
            self.member = None
        if getattr(self, "join", None) is not None:
            await self.join.close()
            self.join = None
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.proxy is not None:
            self.proxy.terminate()
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
            self.proxy = None
        if self.pool is not None:
            self.pool.destroy()
            self.pool = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if getattr(self, "_metrics_redis", None) is not None:
            self._metrics_redis.close()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None

    async def __aenter__(self) -> Platform:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _without_password(url: str) -> str:
    """A Redis URL fit for a log line (container logs are read by more people than the secret)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if not u.password:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return u._replace(netloc=netloc).geturl()


def _serves(sock: Path, pid: int) -> bool:
    """True if the proxy daemon with this pid answers on `sock`."""
    from hearth.dataplane import control

    try:
        hello = control.probe(str(sock), timeout=2.0)
    except OSError:
        return False
    return hello is not None and hello.get("pid") == pid


async def serve_forever(settings: Settings, warm_pool_size: int = 0, announce: Any = print) -> None:
    p = Platform(settings, warm_pool_size=warm_pool_size)
    await p.start()
    freeze_heap()  # this process is the node from now on (not for in-process Platforms)
    collector = collect_heap()
    assert p.agent is not None
    gc_pause = p.agent.metrics.gc_pause
    pauses = GcPauses(lambda gen, s: gc_pause.labels(str(gen)).observe(s)).install()
    redis_shown = _without_password(p.redis_url)
    announce(f"hearth: gateway on {p.url}  (data plane: {p.agent.mode}, redis: {redis_shown})")
    if p.token_created:
        announce(f"hearth: admin token (saved to {settings.token_file}): {p.admin_token}")
    else:
        announce(f"hearth: admin token in {settings.token_file}")
    try:
        await until_signal()
    finally:
        announce("hearth: shutting down (draining in-flight invocations)")
        collector.stop()
        pauses.uninstall()
        await p.stop()
