"""Flower bridge: run an unchanged Flower ``ClientApp`` against Hearth's round endpoint.

A Flower user keeps their ``ClientApp`` (``@app.train()`` or a legacy ``client_fn``). Instead of a
SuperNode that polls the SuperLink every 3 s and starts a new ClientApp process per message,
one long-lived process per client connects to :class:`~hearth.functions.fedavg.roundserver.
RoundServer` and, every round, calls the ClientApp in process with a Flower ``train`` message
built from the current global model, then sends the reply's arrays as an update:

* the reply's ``ArrayRecord`` tensors are read as zero-copy views of their serialised bytes
  (``flower.npy_view``) and go out with ``sendmsg`` (no packed copy);
* the weight is the reply's ``MetricRecord`` value under ``weighted_by_key`` (``num-examples``,
  as Flower's ``FedAvg``), so the global model is Flower's FedAvg result.

The server side replaces the SuperLink + ServerApp's ``FedAvg`` loop: ``hearth fl serve``.
Usage: ``hearth fl flower-client --app my_app.client_app:app --server 127.0.0.1:7070
--partition-id 3 --rounds 10`` (or :func:`run_clientapp` from Python). The returned model's
arrays are views of the client's receive buffer (valid until the next round).
"""

from __future__ import annotations

import importlib
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from hearth.functions.fedavg.client import RoundClient
from hearth.functions.fedavg.flower import npy_view


class BridgeError(RuntimeError):
    """The ClientApp could not be loaded, failed, or replied with something FedAvg cannot use."""


def load_clientapp(ref: str, app_dir: str | None = None) -> ClientApp:
    """``package.module:attribute`` (as in ``[tool.flwr.app.components] clientapp``)."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise BridgeError(f"--app: expected 'module:attribute', got {ref!r}")
    if app_dir and app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise BridgeError(f"cannot load ClientApp {ref!r}: {e}") from None
    if not isinstance(obj, ClientApp):
        raise BridgeError(f"{ref!r} is a {type(obj).__name__}, not a flwr ClientApp")
    return obj


def reply_update(
    reply: Message, weighted_by_key: str = "num-examples"
) -> tuple[list[tuple[str, Any]], int]:
    """A train reply's arrays (zero-copy views, in record order) and its FedAvg weight."""
    if reply.has_error():
        raise BridgeError(f"the ClientApp replied with an error: {reply.error.reason}")
    content = reply.content
    arrays = [r for r in content.values() if isinstance(r, ArrayRecord)]
    metrics = [r for r in content.values() if isinstance(r, MetricRecord)]
    if len(arrays) != 1 or len(metrics) != 1:
        raise BridgeError(
            "a train reply needs exactly one ArrayRecord and one MetricRecord (as Flower's "
            f"FedAvg), got {len(arrays)} and {len(metrics)}"
        )
    if weighted_by_key not in metrics[0]:
        raise BridgeError(f"the reply's MetricRecord has no {weighted_by_key!r}")
    n = metrics[0][weighted_by_key]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BridgeError(f"{weighted_by_key!r} must be a positive integer, got {n!r}")
    layers = []
    for name, arr in arrays[0].items():
        if arr.stype != "numpy.ndarray":
            raise BridgeError(f"array {name!r}: serialised as {arr.stype!r}, not numpy")
        layers.append((name, npy_view(arr.data)))
    return layers, n


def train_message(model: Any, server_round: int, node_id: int, config: dict | None) -> Message:
    """The ``train`` message a ServerApp's FedAvg sends: the global arrays and its config.
    The metadata is what a SuperNode hands its ClientApp (the SuperLink, node 0, sent it)."""
    rec = ArrayRecord({name: Array(arr) for name, arr in model.layers})
    cfg = ConfigRecord({**(config or {}), "server-round": server_round})
    meta = Metadata(
        run_id=0,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type="train",
    )
    return Message(RecordDict({"arrays": rec, "config": cfg}), metadata=meta)


def run_clientapp(
    app: ClientApp,
    address: tuple[str, int],
    token: str,
    *,
    rounds: int,
    partition_id: int,
    node_config: dict | None = None,
    run_config: dict | None = None,
    train_config: dict | None = None,
    weighted_by_key: str = "num-examples",
    client: str | None = None,
    on_round: Callable[[int, Any], None] | None = None,
    shm: bool = False,
) -> Any:
    """Run ``rounds`` rounds of ``app`` as one client; returns the last global model.

    ``on_round(round, model)`` is called with each new global model (views of the receive
    buffer, valid until the next round)."""
    node_id = partition_id + 1
    ctx = Context(
        run_id=0,
        node_id=node_id,
        node_config={"partition-id": partition_id, **(node_config or {})},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    with RoundClient(address, token, client or f"flower-{partition_id}", shm=shm) as rc:
        if rc.model is None:
            raise BridgeError("the round endpoint has no initial model to train from")
        model = rc.model
        for _ in range(rounds):
            rid = rc.next_round
            reply = app(train_message(model, rid, node_id, train_config), ctx)
            layers, n = reply_update(reply, weighted_by_key)
            model = rc.round(layers, n)
            if on_round is not None:
                on_round(rid, model)
        return model
