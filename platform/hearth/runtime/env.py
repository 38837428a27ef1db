"""The environment a function instance starts with: an allow-list of harmless variables from the
agent's own environment, the spec's ``env``, and the boot record — never the agent's secrets.

The agent's environment holds platform credentials (``HEARTH_ADMIN_TOKEN``, ``HEARTH_REDIS_URL``,
``REDIS_PASSWORD`` on Kubernetes, cloud credentials, ...). Function code is somebody else's code,
so nothing is inherited unless it is on the allow-list below. Every way of starting an instance
(a new process, a warm-pool process, a zygote fork) builds its environment here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

#: inherited as is: locale, paths, temp dir, time zone; nothing that can hold a secret
ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "HEARTH_POOL_TRIM",  # how this node's slot pool trims pages: not a secret, keeps views consistent
    }
)
ALLOWED_PREFIXES = ("LC_",)
#: names an instance never gets from the agent, even through a future allow-list entry
DENIED_PREFIXES = ("HEARTH_", "REDIS_", "AWS_", "KUBERNETES_")


def inherited(base: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed part of `base` (the agent's environment)."""
    out = {}
    for k, v in base.items():
        if k in ALLOWED or k.startswith(ALLOWED_PREFIXES):
            if k.startswith(DENIED_PREFIXES) and k != "HEARTH_POOL_TRIM":
                continue
            if k == "PYTHONPATH":
                # an empty or relative entry is the agent's working directory (or below it)
                # on the function's sys.path: instances start with `python -P` to keep it off
                v = os.pathsep.join(e for e in v.split(os.pathsep) if os.path.isabs(e))
                if not v:
                    continue
            out[k] = v
    return out


def instance_env(
    spec_env: Mapping[str, str] | None = None,
    boot: Mapping[str, Any] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The full environment of a new instance process: allow-listed variables, then the spec's
    ``env`` (the function author's own settings win), then the boot record if given
    (``HEARTH_INSTANCE``, which must hold no secret: the instance's environment is readable by
    its code; a zygote hands the boot record over its socket instead)."""
    env = inherited(os.environ if base is None else base)
    env.update(spec_env or {})
    if boot is not None:
        env["HEARTH_INSTANCE"] = json.dumps(dict(boot))
    env["PYTHONUNBUFFERED"] = "1"
    return env
