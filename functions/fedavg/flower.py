"""Flower interoperability: a drop-in ``FedAvg`` strategy whose ``aggregate_fit`` hands the
client results to Hearth's eager, hierarchical aggregation.

Why a strategy subclass: it is the seam Flower users already configure (``ServerApp`` →
``ServerAppComponents(strategy=...)``); nothing else in their app changes. Two modes:

* in process (default): results are folded by a warm :class:`Aggregation` tree in the server
  process. Flower's tensors are ``np.save`` bytes; we read them as zero-copy numpy views of the
  received bytes (no ``np.load`` copy) and fold them chunk-wise, so peak memory is the received
  messages plus two accumulators -- not Flower's 2N+1 models.
* ``gateway=URL``: each result is packed and POSTed to a Hearth gateway's leaf aggregators (a
  deployed tree), then the global model is fetched from the top. Use it when the aggregation
  must run on Hearth nodes (shared memory, placement) instead of the Flower server.

Example::

    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from hearth.functions.fedavg.flower import HearthFedAvg

    def server_fn(context):
        strategy = HearthFedAvg(fan_in=4, min_fit_clients=32, min_available_clients=32)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=10))

    app = ServerApp(server_fn=server_fn)
"""

from __future__ import annotations

import hearth.extras.flower  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import io
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from hearth.functions.fedavg.aggregation import Aggregation
from hearth.functions.fedavg.tree import TreePlan, plan_tree


def npy_view(tensor: bytes | memoryview) -> np.ndarray:
    """A read-only numpy view of one ``np.save``-serialised tensor (Flower's wire format), without
    the copy ``np.load`` makes. Falls back to ``np.load`` for layouts a view cannot express."""
    mv = memoryview(tensor)
    bio = io.BytesIO(mv[:1024].tobytes() if len(mv) > 1024 else mv.tobytes())
    try:
        version = np.lib.format.read_magic(bio)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(bio)
    except ValueError:
        return np.load(io.BytesIO(bytes(mv)), allow_pickle=False)
    if dtype.hasobject:
        raise ValueError("object arrays are not model parameters")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=bio.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def parameters_to_views(params: Parameters) -> list[np.ndarray]:
    """``parameters_to_ndarrays`` without copies (numpy-serialised parameters only)."""
    if params.tensor_type not in ("numpy.ndarray", ""):
        return parameters_to_ndarrays(params)
    return [npy_view(t) for t in params.tensors]


class HearthFedAvg(FedAvg):
    """``FedAvg`` with Hearth's aggregation: same result, streaming and bounded in memory."""

    def __init__(
        self,
        *,
        fan_in: int = 4,
        levels: int | None = None,
        acc_dtype: str = "float32",
        gateway: str | None = None,
        pool: Any = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.fan_in, self.levels, self.acc_dtype = fan_in, levels, np.dtype(acc_dtype)
        self.gateway = gateway
        self.pool = pool
        self._tree: Aggregation | None = None
        self.last_progress: dict[str, Any] = {}
        self._seq = 0

    def __repr__(self) -> str:
        return f"HearthFedAvg(fan_in={self.fan_in}, accept_failures={self.accept_failures})"

    def _aggregation(self, n: int) -> Aggregation:
        # warm reuse: keep the tree (and its accumulators) while the cohort size holds
        if self._tree is None or self._tree.plan.expected != n:
            if self._tree is not None:
                self._tree.close()
            plan: TreePlan = plan_tree(n, fan_in=self.fan_in, levels=self.levels)
            self._tree = Aggregation(plan, acc_dtype=self.acc_dtype, pool=self.pool, keep=1)
        return self._tree

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        if self.gateway:
            from hearth.functions.fedavg.client import aggregate_via_gateway

            arrays = aggregate_via_gateway(
                self.gateway,
                server_round,
                [(parameters_to_views(r.parameters), r.num_examples) for _, r in results],
                fan_in=self.fan_in,
            )
        else:
            agg = self._aggregation(len(results))
            # the tree's own round ids: Flower may replay a server_round (restarts, tests)
            self._seq += 1
            rid = self._seq
            rnd = agg.start_round(rid, min_fraction=1.0 / len(results))
            batch = [
                (
                    parameters_to_views(res.parameters),
                    res.num_examples,
                    f"{i}:{getattr(proxy, 'cid', '') or i}",
                    None,
                )
                for i, (proxy, res) in enumerate(results)
            ]
            errs = agg.submit_models(batch)  # all results are here: grouped folds
            bad = [str(e) for e in errs if e is not None]
            if bad:
                # FedAvg's accept_failures spirit: average the results that are sound
                log(WARNING, "Hearth rejected %d result(s): %s", len(bad), "; ".join(bad[:3]))
                if len(bad) == len(results):
                    self.last_progress = agg.progress()
                    return None, {}
                agg.expire(now=rnd.deadline + 1)
            model = agg.model(rid)
            self.last_progress = agg.progress()
            arrays = model.ndarrays()
        params = ndarrays_to_parameters(arrays)
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn:
            metrics = self.fit_metrics_aggregation_fn(
                [(r.num_examples, r.metrics) for _, r in results]
            )
        elif server_round == 1:
            log(WARNING, "No fit_metrics_aggregation_fn provided")
        return params, metrics
