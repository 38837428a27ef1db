"""The Flower app both sides of the round benchmark run, written into a temp dir.

A ``ClientApp`` returning ``params`` float32 parameters (62 tensors, no training; the values
depend on the partition id, the weight ``num-examples`` on the partition and the round) and a
``ServerApp`` running ``FedAvg`` that records when each round ends and saves the global model.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

APP_CLIENT = '''
"""ClientApp: returns PARAMS float32 parameters without training (deterministic per partition)."""
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

NLAYERS = 62
_CACHE = {}


def layer_sizes(params):
    base = params // NLAYERS
    return [base] * (NLAYERS - 1) + [params - base * (NLAYERS - 1)]


def update_arrays(pid, params):
    """The update of partition `pid` (cached: a persistent process builds it once)."""
    key = (pid, params)
    if key not in _CACHE:
        out = []
        for j, size in enumerate(layer_sizes(params)):
            a = np.linspace(-1.0, 1.0, size, dtype=np.float32)
            a *= np.float32(1.0 + 0.01 * pid + 0.001 * j)
            a += np.float32(0.001 * pid)
            out.append(a)
        _CACHE[key] = out
    return _CACHE[key]


def num_examples(pid, server_round):
    return 10 + 7 * pid + 3 * server_round


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    params = int(context.run_config["params"])
    rnd = int(msg.content["config"]["server-round"])
    arrays = ArrayRecord(update_arrays(pid, params))
    metrics = MetricRecord({"num-examples": num_examples(pid, rnd)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
'''

APP_SERVER = '''
"""ServerApp: FedAvg over every node; records round ends and saves the final model."""
import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hearthbench.client_app import layer_sizes

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["num-clients"])
    rounds = int(context.run_config["num-server-rounds"])
    out = str(context.run_config["out"])
    params = int(context.run_config["params"])
    init = ArrayRecord([np.zeros(s, np.float32) for s in layer_sizes(params)])
    ends = {}

    def evaluate(server_round, arrays):
        ends[server_round] = time.monotonic()
        if server_round == rounds:
            np.savez(out + ".npz", *arrays.to_numpy_ndarrays())
        return MetricRecord({})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=init, num_rounds=rounds,
                   train_config=ConfigRecord({}), evaluate_fn=evaluate)
    with open(out + ".json", "w") as f:
        json.dump({"ends": ends}, f)
'''

APP_TOML = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hearthbench"
version = "1.0.0"
dependencies = ["flwr>=1.42"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hearth"

[tool.flwr.app.components]
serverapp = "hearthbench.server_app:app"
clientapp = "hearthbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
num-clients = 8
params = 1000
out = "/tmp/out"
"""


def write_app(root: Path) -> Path:
    """Write the app (a ``hearthbench`` package and its pyproject) into ``root/app``."""
    app = root / "app"
    (app / "hearthbench").mkdir(parents=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    (app / "hearthbench" / "__init__.py").write_text("")
    (app / "hearthbench" / "client_app.py").write_text(textwrap.dedent(APP_CLIENT))
    (app / "hearthbench" / "server_app.py").write_text(textwrap.dedent(APP_SERVER))
    return app


def app_module(app_dir: Path):
    """The ClientApp module, imported from ``app_dir`` (its update arrays, sizes and weights)."""
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    import hearthbench.client_app as m

    return m
