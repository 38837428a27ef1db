"""H1: function code gets no platform credentials — only allow-listed variables and its spec's env."""

from __future__ import annotations

import json

from sec_helpers import TOKEN, deploy


def test_function_environment_holds_no_platform_secret(private_node):
    deploy(private_node, "envdump", "environ", env={"MY_SETTING": "mine"})
    r = private_node.client.invoke("envdump", b"{}", "application/json")
    seen = r.json()
    env = seen["environ"]
    redis_url = (private_node.state / "redis-url").read_text().strip()
    secrets = {
        "admin token": TOKEN,
        "Redis URL": redis_url,
        "Redis socket": redis_url.removeprefix("unix://").split("?")[0],
        "Redis password": "platform-redis-password-42",
        "cloud secret": "platform-cloud-secret-42",
    }
    blob = json.dumps(env)
    raw = seen["proc_environ"]  # the environment the process was started with
    for what, value in secrets.items():
        assert value not in blob, f"the function can read the {what} in os.environ"
        assert value not in raw, f"the function can read the {what} in /proc/self/environ"
    assert not any(k.startswith(("HEARTH_ADMIN", "HEARTH_REDIS", "REDIS_", "AWS_")) for k in env)
    assert env["MY_SETTING"] == "mine"  # the spec's own env arrives
    assert "PATH" in env  # and the harmless basics
