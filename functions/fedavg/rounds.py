"""Rounds: who may still submit, when a round closes, and the global models of the last N rounds.

A pure state machine: every method takes ``now`` (epoch seconds) from the caller, so tests and
the simulator drive time explicitly and nothing here sleeps or reads a clock.

States: ``open`` → ``closed`` (all expected updates folded, or the deadline passed with at least
``min_fraction`` of them) or ``failed`` (deadline passed with fewer). Updates that arrive after
the round left ``open`` are *late* and rejected with :class:`LateUpdate`; clients that never
submitted are the round's stragglers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["open", "closed", "failed"]


class RoundError(ValueError):
    """A round operation was refused; the message says why."""


class LateUpdate(RoundError):
    """An update arrived for a round that is no longer open."""


class DuplicateUpdate(RoundError):
    """A client submitted twice in one round."""


class UnknownRound(RoundError):
    """No such round (never opened, or older than the kept history)."""


@dataclass
class Round:
    round_id: int
    expected: int
    deadline: float  # epoch seconds
    min_fraction: float = 1.0
    clients: frozenset[str] | None = None  # expected client ids, if known
    state: State = "open"
    received: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # client -> reason (bad updates)
    closed_at: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.expected < 1:
            raise RoundError(f"expected: a round needs at least 1 client, got {self.expected}")
        if not 0.0 < self.min_fraction <= 1.0:
            raise RoundError(f"min_fraction: must be in (0, 1], got {self.min_fraction}")
        if self.clients is not None and len(self.clients) != self.expected:
            raise RoundError(
                f"clients: {len(self.clients)} ids given for {self.expected} expected clients"
            )

    @property
    def quorum(self) -> int:
        """Updates needed to close at the deadline."""
        return max(1, math.ceil(self.min_fraction * self.expected - 1e-9))

    def accept(self, client: str, now: float) -> None:
        """Admit an update from ``client`` or raise (late, duplicate, unknown client)."""
        if self.state == "open" and now > self.deadline:
            self.expire(now)
        if self.state != "open":
            raise LateUpdate(
                f"round {self.round_id} is {self.state} (since {self.closed_at:.3f}: {self.reason}); "
                f"late update from {client!r} rejected"
            )
        if self.clients is not None and client not in self.clients:
            raise RoundError(f"round {self.round_id}: client {client!r} is not part of this round")
        if client in self.received:
            raise DuplicateUpdate(f"round {self.round_id}: client {client!r} already submitted")
        if len(self.received) >= self.expected:
            raise LateUpdate(
                f"round {self.round_id}: all {self.expected} updates already received; update from {client!r} rejected"
            )
        self.received.append(client)

    def reject(self, client: str, reason: str) -> None:
        """A bad update: it does not count, the client may resubmit while the round is open."""
        if client in self.received:
            self.received.remove(client)
        self.rejected[client] = reason

    @property
    def complete(self) -> bool:
        return len(self.received) >= self.expected

    def close(self, now: float, reason: str = "all expected updates folded") -> None:
        if self.state != "open":
            raise RoundError(f"round {self.round_id} is already {self.state}")
        self.state, self.closed_at, self.reason = "closed", now, reason

    def fail(self, now: float, reason: str) -> None:
        """The server could not finish the round (an internal error): no model for it."""
        if self.state == "open":
            self.state, self.closed_at, self.reason = "failed", now, reason

    def expire(self, now: float) -> State:
        """Deadline handling: close with the updates at hand if the quorum is met, else fail."""
        if self.state != "open":
            return self.state
        if len(self.received) >= self.quorum:
            self.close(now, f"deadline passed with {len(self.received)}/{self.expected} updates")
        else:
            self.state, self.closed_at = "failed", now
            self.reason = f"deadline passed with {len(self.received)}/{self.expected} updates (need {self.quorum})"
        return self.state

    def due(self, now: float) -> bool:
        return self.state == "open" and now > self.deadline

    @property
    def stragglers(self) -> list[str] | int:
        """Clients that did not submit: their ids if known, else how many are missing."""
        if self.clients is not None:
            return sorted(self.clients - set(self.received))
        return self.expected - len(self.received)

    def status(self) -> dict[str, Any]:
        return {
            "round": self.round_id,
            "state": self.state,
            "expected": self.expected,
            "received": len(self.received),
            "quorum": self.quorum,
            "deadline": self.deadline,
            "stragglers": self.stragglers,
            "rejected": dict(self.rejected),
            "reason": self.reason,
        }


@dataclass
class GlobalModel:
    """A round's result: the averaged layers (views of ``payload`` when it was packed)."""

    round_id: int
    n: int  # Σn
    layers: list[tuple[str, Any]]
    payload: Any = None  # packed 'model' payload (bytes-like), servable for download
    contributors: int = 0

    def ndarrays(self) -> list[Any]:
        return [a for _, a in self.layers]


class RoundBook:
    """Rounds by id plus the global models of the last ``keep`` closed rounds."""

    def __init__(self, keep: int = 3):
        if keep < 1:
            raise RoundError(f"keep: must keep at least 1 model, got {keep}")
        self.keep = keep
        self.rounds: OrderedDict[int, Round] = OrderedDict()
        self.models: OrderedDict[int, GlobalModel] = OrderedDict()
        self.dropped: list[GlobalModel] = []  # evicted models (the caller frees their slots)

    def open(self, rnd: Round) -> Round:
        if rnd.round_id in self.rounds:
            raise RoundError(
                f"round {rnd.round_id} already exists ({self.rounds[rnd.round_id].state})"
            )
        if self.rounds and rnd.round_id < max(self.rounds):
            raise RoundError(f"round {rnd.round_id} is older than round {max(self.rounds)}")
        self.rounds[rnd.round_id] = rnd
        while len(self.rounds) > 4 * self.keep + 4:
            self.rounds.popitem(last=False)
        return rnd

    def get(self, round_id: int) -> Round:
        try:
            return self.rounds[round_id]
        except KeyError:
            raise UnknownRound(
                f"round {round_id} is unknown (known: {list(self.rounds) or 'none'})"
            ) from None

    def publish(self, model: GlobalModel) -> list[GlobalModel]:
        """Keep the model; returns the models evicted to stay within ``keep``."""
        self.models[model.round_id] = model
        out = []
        while len(self.models) > self.keep:
            out.append(self.models.popitem(last=False)[1])
        self.dropped.extend(out)
        return out

    def model(self, round_id: int | None = None) -> GlobalModel:
        if not self.models:
            raise UnknownRound("no global model has been published yet")
        if round_id is None:
            return next(reversed(self.models.values()))
        try:
            return self.models[round_id]
        except KeyError:
            raise UnknownRound(
                f"no global model for round {round_id} (kept: {list(self.models)})"
            ) from None
