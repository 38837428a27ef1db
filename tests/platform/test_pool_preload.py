"""What a generic warm-pool instance imports before it is specialised (`POOL_PRELOAD`): the
common dependencies and the built-ins' package `hearth.functions` (empty, platform code: its
first import through the development venv's finder was 0.36-0.51 ms of a pool start, #19), and
no function's code, not even the platform's own examples (the cold-start benchmark's
reference handlers). Run in a fresh interpreter: what the pool instance's `run` imports."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json
import sys

from hearth.runtime.instance import Instance


class Pooled(Instance):
    # `Instance.run` of a pool instance (no spec in its boot record), its report kept and no
    # serve loop after it
    def __init__(self):
        self.boot, self.phases, self.reports = {}, {}, []

    def report(self, event, **meta):
        self.reports.append(event)

    def serve(self):
        return 0


before = sorted(m for m in sys.modules if m.startswith("hearth.functions"))
p = Pooled()
assert p.run() == 0
after = sorted(m for m in sys.modules if m.startswith("hearth.functions"))
print(json.dumps({"before": before, "after": after, "reports": p.reports,
                  "numpy": "numpy" in sys.modules}))
"""


def test_a_pool_instance_preloads_the_builtins_package_and_no_function_code() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == []  # the runtime itself does not import it
    assert got["after"] == ["hearth.functions"]  # the package, none of its functions
    assert got["numpy"] and got["reports"] == ["pooled"]
