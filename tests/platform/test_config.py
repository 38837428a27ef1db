"""Node settings from the environment: slot-pool classes and sizes, with errors naming the entry."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hearth.config import Settings, http_url, parse_size
from hearth.redis_server import free_port
from hearth.up import Platform


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("4096", 4096),
        ("64KiB", 65536),
        ("1MiB", 1 << 20),
        ("1.5GiB", 3 << 29),
        ("256mib", 256 << 20),
    ],
)
def test_sizes_use_binary_units(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("64KiB", "entry 1 ('64KiB'): expected size:count"),
        ("64KiB:10,1MiB:x", "entry 2 ('1MiB:x'): count must be a whole number"),
        ("64KB:10", "size '64KB' must be a number with B, KiB, MiB or GiB"),
        ("64KiB:0", "size and count must be positive"),
        ("1MiB:2,1MiB:3", "each slot size may appear once"),
        (
            "64KiB:4,3GiB:1",
            "entry 2 ('3GiB:1'): a slot holds at most 2 GiB (2147483648 bytes), got 3221225472",
        ),
    ],
)
def test_bad_pool_classes_are_refused_naming_the_entry(monkeypatch, value, message) -> None:
    monkeypatch.setenv("HEARTH_POOL_CLASSES", value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env()


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("1MiB:lots", "entry 1 ('1MiB:lots'): count must be a whole number"),
        (
            "64KiB:4,2049MiB:1",
            "entry 2 ('2049MiB:1'): a slot holds at most 2 GiB (2147483648 bytes),"
            " got 2148532224 bytes",
        ),
    ],
)
def test_hearth_up_refuses_bad_pool_classes_in_one_line(tmp_path, value, line) -> None:
    env = {
        "HEARTH_POOL_CLASSES": value,
        "HEARTH_STATE_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    r = subprocess.run(
        [sys.executable, "-m", "hearth.cli", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: HEARTH_POOL_CLASSES {line}"]


async def test_platform_pool_has_the_configured_classes(redis_url, tmp_path) -> None:
    s = Settings(
        port=free_port(),
        redis_url=redis_url,
        state=tmp_path,
        admin_token="cfg-token-123456",
        pool_classes="64KiB:128,512MiB:3",
    )
    async with Platform(s) as p:
        classes = p.pool.stats()["classes"]
    assert {c["slot_size"]: c["total"] for c in classes.values()} == {64 << 10: 128, 512 << 20: 3}


def test_runner_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("HEARTH_RUNNER", raising=False)
    assert Settings.from_env().runner == "zygote"
    monkeypatch.setenv("HEARTH_RUNNER", "process")
    assert Settings.from_env().runner == "process"
    monkeypatch.setenv("HEARTH_RUNNER", "fork")
    with pytest.raises(ValueError, match="HEARTH_RUNNER must be zygote or process, not 'fork'"):
        Settings.from_env()


def test_zygote_wait_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("HEARTH_ZYGOTE_WAIT_S", raising=False)
    assert Settings.from_env().zygote_wait_s == 2.0  # without progress; see zygote_wait
    monkeypatch.setenv("HEARTH_ZYGOTE_WAIT_S", "0")  # never wait for the built-ins' zygote
    assert Settings.from_env().zygote_wait_s == 0.0
    for bad, why in (("-1", "between 0 and 600"), ("soon", "a number of seconds")):
        monkeypatch.setenv("HEARTH_ZYGOTE_WAIT_S", bad)
        with pytest.raises(ValueError, match=f"HEARTH_ZYGOTE_WAIT_S .*{why}"):
            Settings.from_env()


def test_zygote_wait_cap_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("HEARTH_ZYGOTE_WAIT_MAX_S", raising=False)
    assert Settings.from_env().zygote_wait_max_s == 30.0  # progress or not; see zygote_wait
    monkeypatch.setenv("HEARTH_ZYGOTE_WAIT_MAX_S", "5")
    assert Settings.from_env().zygote_wait_max_s == 5.0
    for bad, why in (("601", "between 0 and 600"), ("-1", "between 0 and 600"), ("x", "a number")):
        monkeypatch.setenv("HEARTH_ZYGOTE_WAIT_MAX_S", bad)
        with pytest.raises(ValueError, match=f"HEARTH_ZYGOTE_WAIT_MAX_S .*{why}"):
            Settings.from_env()


def test_zygote_fork_timeout_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("HEARTH_ZYGOTE_FORK_TIMEOUT_S", raising=False)
    assert Settings.from_env().zygote_fork_timeout_s == 10.0  # a fork takes milliseconds
    monkeypatch.setenv("HEARTH_ZYGOTE_FORK_TIMEOUT_S", "0.5")
    assert Settings.from_env().zygote_fork_timeout_s == 0.5
    for bad, why in (("0", "more than 0"), ("601", "at most 600"), ("never", "a number")):
        monkeypatch.setenv("HEARTH_ZYGOTE_FORK_TIMEOUT_S", bad)  # (0 would fail every fork)
        with pytest.raises(ValueError, match=f"HEARTH_ZYGOTE_FORK_TIMEOUT_S .*{why}"):
            Settings.from_env()


def test_zygote_retry_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("HEARTH_ZYGOTE_RETRY_S", raising=False)
    assert Settings.from_env().zygote_retry_s == 30.0
    monkeypatch.setenv("HEARTH_ZYGOTE_RETRY_S", "0")  # the next start tries a new zygote
    assert Settings.from_env().zygote_retry_s == 0.0
    for bad, why in (
        ("-1", "between 0 and 3600"),
        ("3601", "between 0 and 3600"),
        ("x", "a number"),
    ):
        monkeypatch.setenv("HEARTH_ZYGOTE_RETRY_S", bad)
        with pytest.raises(ValueError, match=f"HEARTH_ZYGOTE_RETRY_S .*{why}"):
            Settings.from_env()


def test_max_joined_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("HEARTH_MAX_JOINED", raising=False)
    assert Settings.from_env().max_joined == 256
    monkeypatch.setenv("HEARTH_MAX_JOINED", "8")
    assert Settings.from_env().max_joined == 8
    for bad, why in (("0", "between 1 and 65536, not 0"), ("many", "a whole number, not 'many'")):
        monkeypatch.setenv("HEARTH_MAX_JOINED", bad)
        with pytest.raises(ValueError, match=f"HEARTH_MAX_JOINED must be {why}"):
            Settings.from_env()


def test_start_timeout_setting_is_checked(monkeypatch) -> None:
    from hearth.agent.starts import START_TIMEOUT_S

    monkeypatch.delenv("HEARTH_START_TIMEOUT_S", raising=False)
    assert Settings.from_env().start_timeout_s == START_TIMEOUT_S == 30.0
    monkeypatch.setenv("HEARTH_START_TIMEOUT_S", "5")
    assert Settings.from_env().start_timeout_s == 5.0
    for bad, why in (("0", "more than 0"), ("3601", "at most 3600"), ("soon", "a number")):
        monkeypatch.setenv("HEARTH_START_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"HEARTH_START_TIMEOUT_S .*{why}"):
            Settings.from_env()


def test_cluster_settings_default_to_loopback_and_refuse_weak_values(monkeypatch) -> None:
    for k in ("HEARTH_CLUSTER_TOKEN", "HEARTH_LINK_HOST", "HEARTH_HEARTBEAT_S"):
        monkeypatch.delenv(k, raising=False)
    s = Settings.from_env()
    assert s.cluster_token is None and s.link_host == "127.0.0.1"  # no link, nothing exposed
    monkeypatch.setenv("HEARTH_CLUSTER_TOKEN", "short")
    with pytest.raises(ValueError, match="HEARTH_CLUSTER_TOKEN must be at least 16"):
        Settings.from_env()
    monkeypatch.setenv("HEARTH_CLUSTER_TOKEN", "x" * 16)
    monkeypatch.setenv("HEARTH_HEARTBEAT_S", "0")
    with pytest.raises(ValueError, match="HEARTH_HEARTBEAT_S"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("histo:bin_s=1", "entry 1 ('histo:bin_s=1'): unknown keep-alive policy 'histo'"),
        ("fixed:60;histogram:colour=2", "entry 2 ('histogram:colour=2')"),
        ("histogram:bin_s=x", "bin_s must be a number, got 'x'"),
        ("fixed:1;fixed:2", "policy 'fixed' is tuned twice"),
    ],
)
def test_bad_keepalive_tuning_is_refused_naming_the_entry(monkeypatch, value, message) -> None:
    monkeypatch.setenv("HEARTH_KEEPALIVE_TUNING", value)
    with pytest.raises(ValueError, match="HEARTH_KEEPALIVE_TUNING: .*" + re.escape(message)):
        Settings.from_env()


def test_keepalive_tuning_builds_the_named_policy_with_its_parameters(monkeypatch) -> None:
    monkeypatch.setenv("HEARTH_KEEPALIVE_TUNING", "histogram:bin_s=2,range_s=60; fixed:30")
    ps = Settings.from_env().keepalive_policies()
    ps.set("f", "histogram")
    ps.set("g", "fixed")
    ps.set("h", "coldstart-aware")  # not tuned: its defaults
    h = ps.get("f")
    assert (h.name, h.bin_s, h.nbins) == ("histogram", 2.0, 30)
    assert ps.get("g").ttl_s == 30.0
    assert ps.get("h").min_prewarm_s == 30.0


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("10.0.0.7", "http://10.0.0.7:8080"),
        ("node-a.cluster.local", "http://node-a.cluster.local:8080"),
        ("fd00::7", "http://[fd00::7]:8080"),
        ("[fd00::7]", "http://[fd00::7]:8080"),
    ],
)
def test_announced_urls_bracket_ipv6_addresses(host, url) -> None:
    """An agent on an IPv6-only cluster announces a URL its peers and the front can parse."""
    assert http_url(host, 8080) == url
    from yarl import URL

    assert URL(url).port == 8080
