"""Settings for a Hearth node, from environment variables (HEARTH_*) with safe defaults:
loopback only, a generated admin token, a bounded body size."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hearth.agent.zygote_wait import (
    FORK_TIMEOUT_S,
    ZYGOTE_RETRY_S,
    ZYGOTE_WAIT_MAX_S,
    ZYGOTE_WAIT_S,
)
from hearth.redis_server import state_dir

if TYPE_CHECKING:
    from hearth.agent.spin_policy import SpinConfig
    from hearth.gateway.body import BodyLimits

DEFAULT_PORT = 8080
MIN_TOKEN_LEN = 16  # an admin token shorter than this (or empty) is refused: it is guessable


class TokenError(ValueError):
    """The configured or stored admin token is unusable (empty or too short)."""


if TYPE_CHECKING:
    from hearth.controller.keepalive import PolicySet


def _env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def _seconds(name: str, default: float) -> float:
    return _number(name, default, " of seconds")


def _number(name: str, default: float, unit: str = "") -> float:
    v = _env(name)
    try:
        return default if v is None else float(v)
    except ValueError:
        raise ValueError(f"{name} must be a number{unit}, not {v!r}") from None


def _whole(name: str, default: int) -> int:
    v = _env(name)
    try:
        return default if v is None else int(v)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {v!r}") from None


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    redis_url: str | None = None  # None: `hearth up` starts a private redis-server
    state: Path = field(default_factory=state_dir)
    node: str = "local"
    dataplane_mode: str = "auto"  # auto | ebpf | unix
    max_body_bytes: int = 256 * 1024 * 1024
    admin_token: str | None = None
    metrics_token: str | None = (
        None  # read-only bearer token for /metrics (the admin one works too)
    )
    pool_name: str | None = None
    result_ttl_s: int = 3600
    nodes: str | None = None  # simulated nodes "name:cpu_millicores:memory_mb,..." (HEARTH_NODES)
    pool_classes: str | None = None  # slot classes "size:count,..." (HEARTH_POOL_CLASSES)
    keepalive_default: str = "fixed"
    # request bodies (hearth.gateway.body.BodyLimits): slow clients and memory
    max_queue_wait_s: float | None = None  # bound on queueing at the measured handler time
    shed_loop_lag_s: float | None = 0.5  # invokes answered 503 while the loop stays later
    async_backlog: int = 10_000  # async invocations waiting per function before 429
    body_grace_s: float = 10.0
    body_min_rate: int = 256 * 1024
    body_per_client: int = 256
    body_inflight_bytes: int = 1 << 30
    # a connection with no request in progress (never sent one, sent part of a head, or idle
    # after an answer) is closed after this long (HEARTH_IDLE_S): aiohttp's default is an hour,
    # so a client could hold thousands of descriptors with heads it never finishes
    idle_s: float = 75.0
    runner: str = "zygote"  # zygote | process: how instances start (HEARTH_RUNNER)
    zygote_preload: str = ""  # modules the node's zygote also imports (HEARTH_ZYGOTE_PRELOAD)
    # how long a start of a built-in function waits for the built-ins' zygote still coming up
    # while it shows no progress, before it takes a generic pool instance; while the zygote
    # works, starts wait for it (HEARTH_ZYGOTE_WAIT_S; hearth.agent.zygote_wait)
    zygote_wait_s: float = ZYGOTE_WAIT_S
    # how long after that zygote's start starts wait for it at all, progress or not
    # (HEARTH_ZYGOTE_WAIT_MAX_S): a preload that spins or a process stuck in disk wait looks
    # like progress
    zygote_wait_max_s: float = ZYGOTE_WAIT_MAX_S
    # how long a start waits for a ready zygote's fork before it goes on as a plain process and
    # that zygote forks no more (HEARTH_ZYGOTE_FORK_TIMEOUT_S; a stopped or hung zygote)
    zygote_fork_timeout_s: float = FORK_TIMEOUT_S
    # a zygote that failed (its start, or a fork) is not started again for this long
    # (HEARTH_ZYGOTE_RETRY_S); starts meanwhile are plain processes
    zygote_retry_s: float = ZYGOTE_RETRY_S
    # the longest busy-poll for a lone warm call's reply, µs (HEARTH_SPIN_US; 0: never spin,
    # the default: interleaved A/Bs on 7 Dec 2026 showed no gain, docs/platform.md; 150 to opt in)
    spin_us: float = 0.0
    # many nodes: the agent-to-agent link is on only with a shared cluster token
    cluster_token: str | None = None  # HEARTH_CLUSTER_TOKEN
    link_host: str = "127.0.0.1"  # HEARTH_LINK_HOST (loopback unless configured)
    link_port: int = 0  # HEARTH_LINK_PORT (0: any free port, announced to the peers)
    advertise: str | None = None  # HEARTH_ADVERTISE: the host peers and the front gateway dial
    heartbeat_s: float = 1.0  # HEARTH_HEARTBEAT_S (a peer is dead after 3 missed beats)
    # join connections (instance pods) open at once on this node agent (HEARTH_MAX_JOINED)
    max_joined: int = 256
    # how long a start waits for its instance's ready report before it kills it, at least the
    # function's timeout (HEARTH_START_TIMEOUT_S; hearth.agent.starts.START_TIMEOUT_S)
    start_timeout_s: float = 30.0
    # the keep-alive policies' parameters on this node (HEARTH_KEEPALIVE_TUNING), e.g.
    # "histogram:bin_s=10,range_s=3600;coldstart-aware:gb_s_per_cold_s=20"
    keepalive_tuning: str | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        s = cls(
            host=_env("HEARTH_HOST", "127.0.0.1") or "127.0.0.1",
            port=int(_env("HEARTH_PORT", str(DEFAULT_PORT)) or DEFAULT_PORT),
            redis_url=_env("HEARTH_REDIS_URL"),
            node=_env("HEARTH_NODE", "local") or "local",
            dataplane_mode=_env("HEARTH_DATAPLANE", "auto") or "auto",
            max_body_bytes=int(_env("HEARTH_MAX_BODY_BYTES", str(256 * 1024 * 1024)) or 0),
            admin_token=_env("HEARTH_ADMIN_TOKEN"),
            metrics_token=_env("HEARTH_METRICS_TOKEN"),
            nodes=_env("HEARTH_NODES"),
            pool_classes=_env("HEARTH_POOL_CLASSES"),
            result_ttl_s=int(_env("HEARTH_RESULT_TTL_S", "3600") or 3600),
            max_queue_wait_s=float(_env("HEARTH_MAX_QUEUE_WAIT_S") or 0) or None,
            shed_loop_lag_s=float(_env("HEARTH_SHED_LOOP_LAG_S", "0.5") or 0) or None,
            async_backlog=int(_env("HEARTH_ASYNC_BACKLOG", "10000") or 10000),
            body_grace_s=float(_env("HEARTH_BODY_GRACE_S", "10") or 10),
            body_min_rate=parse_size(_env("HEARTH_BODY_MIN_RATE", "256KiB") or "256KiB"),
            body_per_client=int(_env("HEARTH_BODY_PER_CLIENT", "256") or 256),
            body_inflight_bytes=parse_size(
                _env("HEARTH_BODY_INFLIGHT_BYTES", "1GiB") or "1GiB", "HEARTH_BODY_INFLIGHT_BYTES"
            ),
            idle_s=_seconds("HEARTH_IDLE_S", 75.0),
            runner=_env("HEARTH_RUNNER", "zygote") or "zygote",
            zygote_preload=_env("HEARTH_ZYGOTE_PRELOAD", "") or "",
            zygote_wait_s=_seconds("HEARTH_ZYGOTE_WAIT_S", ZYGOTE_WAIT_S),
            zygote_wait_max_s=_seconds("HEARTH_ZYGOTE_WAIT_MAX_S", ZYGOTE_WAIT_MAX_S),
            zygote_fork_timeout_s=_seconds("HEARTH_ZYGOTE_FORK_TIMEOUT_S", FORK_TIMEOUT_S),
            zygote_retry_s=_seconds("HEARTH_ZYGOTE_RETRY_S", ZYGOTE_RETRY_S),
            spin_us=_number("HEARTH_SPIN_US", 0.0),
            cluster_token=_env("HEARTH_CLUSTER_TOKEN"),
            link_host=_env("HEARTH_LINK_HOST", "127.0.0.1") or "127.0.0.1",
            link_port=int(_env("HEARTH_LINK_PORT", "0") or 0),
            advertise=_env("HEARTH_ADVERTISE"),
            heartbeat_s=float(_env("HEARTH_HEARTBEAT_S", "1.0") or 1.0),
            max_joined=_whole("HEARTH_MAX_JOINED", 256),
            start_timeout_s=_seconds("HEARTH_START_TIMEOUT_S", 30.0),
            keepalive_tuning=_env("HEARTH_KEEPALIVE_TUNING"),
        )
        sd = _env("HEARTH_STATE_DIR")
        if sd:
            s.state = Path(sd)
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        if s.dataplane_mode not in ("auto", "ebpf", "unix"):
            raise ValueError(
                f"HEARTH_DATAPLANE must be auto, ebpf or unix, not {s.dataplane_mode!r}"
            )
        if s.runner not in ("zygote", "process"):
            raise ValueError(f"HEARTH_RUNNER must be zygote or process, not {s.runner!r}")
        if s.cluster_token is not None and len(s.cluster_token) < 16:
            raise ValueError("HEARTH_CLUSTER_TOKEN must be at least 16 characters")
        if not 0 <= s.zygote_wait_s <= 600:
            raise ValueError(
                f"HEARTH_ZYGOTE_WAIT_S must be between 0 and 600 seconds, not {s.zygote_wait_s:g}"
            )
        if not 0 <= s.zygote_wait_max_s <= 600:
            raise ValueError(
                "HEARTH_ZYGOTE_WAIT_MAX_S must be between 0 and 600 seconds, "
                f"not {s.zygote_wait_max_s:g}"
            )
        if not 0 < s.zygote_fork_timeout_s <= 600:
            raise ValueError(
                "HEARTH_ZYGOTE_FORK_TIMEOUT_S must be more than 0 and at most 600 seconds, "
                f"not {s.zygote_fork_timeout_s:g}"
            )
        if not 0 <= s.zygote_retry_s <= 3600:
            raise ValueError(
                "HEARTH_ZYGOTE_RETRY_S must be between 0 and 3600 seconds, "
                f"not {s.zygote_retry_s:g}"
            )
        if not 0 <= s.spin_us <= 1000:
            raise ValueError(f"HEARTH_SPIN_US must be between 0 and 1000, not {s.spin_us:g}")
        if not 0.05 <= s.heartbeat_s <= 60:
            raise ValueError("HEARTH_HEARTBEAT_S must be between 0.05 and 60 seconds")
        if not 0 < s.start_timeout_s <= 3600:
            raise ValueError(
                "HEARTH_START_TIMEOUT_S must be more than 0 and at most 3600 seconds, "
                f"not {s.start_timeout_s:g}"
            )
        if not 1 <= s.idle_s <= 3600:
            raise ValueError(f"HEARTH_IDLE_S must be between 1 and 3600 seconds, not {s.idle_s:g}")
        if not 1 <= s.max_joined <= 65536:
            raise ValueError(f"HEARTH_MAX_JOINED must be between 1 and 65536, not {s.max_joined}")
        s.pool_class_list()  # bad values fail here, before anything starts
        s.keepalive_policies()
        s.node_list()
        return s

    def spin_config(self) -> SpinConfig:
        """The agent's busy-poll for a lone call's reply (`hearth.agent.spin_policy`)."""
        from hearth.agent.spin_policy import SpinConfig

        return SpinConfig(cap_s=self.spin_us * 1e-6)

    def body_limits(self) -> BodyLimits:
        from hearth.gateway.body import BodyLimits

        return BodyLimits(
            max_body_bytes=self.max_body_bytes,
            grace_s=self.body_grace_s,
            min_rate=self.body_min_rate,
            per_client=self.body_per_client,
            inflight_bytes=max(self.body_inflight_bytes, 1),
        )

    def keepalive_policies(self) -> PolicySet:
        """The keep-alive policies of this node, tuned by HEARTH_KEEPALIVE_TUNING."""
        from hearth.controller.keepalive import PolicySet, parse_tuning

        try:
            return PolicySet(self.keepalive_default, tuning=parse_tuning(self.keepalive_tuning))
        except ValueError as e:
            raise ValueError(f"HEARTH_KEEPALIVE_TUNING: {e}") from None

    def pool_class_list(self) -> list[tuple[int, int]] | None:
        """Parse HEARTH_POOL_CLASSES ("64KiB:4096,1MiB:256,16MiB:16,256MiB:16") into
        (slot size, count) pairs; None: the data plane's defaults. Slots are allocated lazily,
        so generous counts cost address space, not memory."""
        if not self.pool_classes:
            return None
        from hearth.dataplane.slots import MAX_SLOT_BYTES

        out = []
        for i, part in enumerate(self.pool_classes.split(",")):
            size, sep, count = part.strip().partition(":")
            where = f"HEARTH_POOL_CLASSES entry {i + 1} ({part.strip()!r})"
            if not sep:
                raise ValueError(f"{where}: expected size:count, e.g. 256MiB:8")
            try:
                n = int(count)
            except ValueError:
                raise ValueError(f"{where}: count must be a whole number") from None
            b = parse_size(size, where)
            if n <= 0 or b <= 0:
                raise ValueError(f"{where}: size and count must be positive")
            if b > MAX_SLOT_BYTES:  # (a slot's length is a u32 in the slot table)
                raise ValueError(
                    f"{where}: a slot holds at most 2 GiB ({MAX_SLOT_BYTES} bytes), got {b} bytes"
                )
            out.append((b, n))
        if len({b for b, _ in out}) != len(out):
            raise ValueError("HEARTH_POOL_CLASSES: each slot size may appear once")
        return out

    def node_list(self) -> list:
        """Parse HEARTH_NODES ("a:4000:8192,b:4000:8192") into controller Nodes (None: this machine)."""
        from hearth.controller.model import Node

        if not self.nodes:
            return []
        out = []
        for i, part in enumerate(self.nodes.split(",")):
            bits = part.strip().split(":")
            if len(bits) != 3:
                raise ValueError(
                    f"HEARTH_NODES entry {i + 1} ({part!r}): expected name:cpu_millicores:memory_mb"
                )
            try:
                out.append(Node(name=bits[0], cpu_millicores=int(bits[1]), memory_mb=int(bits[2])))
            except ValueError:
                raise ValueError(
                    f"HEARTH_NODES entry {i + 1} ({part!r}): cpu and memory must be whole numbers"
                ) from None
        if len({n.name for n in out}) != len(out):
            raise ValueError("HEARTH_NODES: node names must be unique")
        return out

    @property
    def gateway_url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def token_file(self) -> Path:
        return self.state / "admin-token"

    def ensure_admin_token(self) -> tuple[str, bool]:
        """The configured token, else the stored one, else a new one (0600). Returns (token, created)."""
        if self.admin_token:
            _check_token(self.admin_token, "HEARTH_ADMIN_TOKEN")
            return self.admin_token, False
        if self.token_file.exists():
            tok = self.token_file.read_text().strip()
            _check_token(tok, str(self.token_file))
            self.admin_token = tok
            return self.admin_token, False
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        tok = "hth_" + secrets.token_urlsafe(24)
        write_private(self.token_file, tok)
        self.admin_token = tok
        return tok, True


def _check_token(tok: str, where: str) -> None:
    if len(tok) < MIN_TOKEN_LEN:
        raise TokenError(
            f"{where}: the admin token is {'empty' if not tok else 'too short'} "
            f"(at least {MIN_TOKEN_LEN} characters); delete the file to get a new one"
        )


def read_admin_token(state: Path | None = None) -> str | None:
    """For CLI clients: HEARTH_ADMIN_TOKEN, else the token file `hearth up` wrote."""
    tok = _env("HEARTH_ADMIN_TOKEN")
    if tok:
        return tok
    p = (state or state_dir()) / "admin-token"
    return p.read_text().strip() if p.exists() else None


def http_url(host: str, port: int) -> str:
    """An http URL for a host name or address; IPv6 literals need brackets (RFC 3986)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def read_redis_url(state: Path | None = None) -> str | None:
    """For CLI clients: HEARTH_REDIS_URL, else the URL of the Redis that `hearth up` runs."""
    url = _env("HEARTH_REDIS_URL")
    if url:
        return url
    p = (state or state_dir()) / "redis-url"
    return p.read_text().strip() if p.exists() else None


def write_private(path: Path, text: str) -> None:
    """Write a small owner-only (0600) file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
}


def parse_size(text: str, where: str = "size") -> int:
    """'256MiB', '64KiB', '1GiB', '4096' -> bytes (binary units; a clear error otherwise)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if unit not in _UNITS or not num:
        raise ValueError(f"{where}: size {text.strip()!r} must be a number with B, KiB, MiB or GiB")
    try:
        return int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{where}: size {text.strip()!r} is not a number") from None
