"""The values that move through a round: client updates, round results, the final result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oiafed.core.client_states import ClientStates
from oiafed.device import to_device

Weights = dict[str, torch.Tensor]
"""A model's weights: parameter and buffer name -> tensor (a ``state_dict``)."""

Tensors = dict[str, torch.Tensor]
"""Named tensors an algorithm sends beside the model weights (control variates, ...)."""

JSON = Any
"""A value that JSON can hold: None, bool, int, float, str, and lists and string-keyed dicts
of those."""


@dataclass
class RoundTask:
    """What every client sampled in a round receives: the round's part of a task message.

    Attributes:
        round_num: the round (from 1).
        weights: the global weights the clients start from.
        config: the trainer's per-round settings (``trainer.fit_config``: ``lr``, ...).
        extra_tensors: named tensors an algorithm broadcasts (empty for FedAvg).
        extra_values: named JSON values an algorithm broadcasts (empty for FedAvg).
    """

    round_num: int
    weights: Weights
    config: dict[str, JSON] = field(default_factory=dict)
    extra_tensors: Tensors = field(default_factory=dict)
    extra_values: dict[str, JSON] = field(default_factory=dict)


@dataclass
class ClientTask:
    """One client's own part of a task message.

    Attributes:
        client_id: the client to train.
        seed: the seed of its local training in this round (data order, dropout, ...).
        extra_tensors, extra_values: what an algorithm sends this client alone.
    """

    client_id: str
    seed: int
    extra_tensors: Tensors = field(default_factory=dict)
    extra_values: dict[str, JSON] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What one client sends back after local training.

    Attributes:
        client_id: the client's id (``client_3``).
        num_samples: how many local samples it trained on (the FedAvg weight).
        metrics: local training metrics; at least ``accuracy`` and ``loss``.
        weights: the client's model weights after training.
        extra_tensors: named tensors the algorithm's client half returns (empty for FedAvg).
        extra_values: named JSON values the algorithm's client half returns.
        attacked: the client is one a simulated ``attack`` controls (set by the server).
    """

    client_id: str
    num_samples: int
    metrics: dict[str, float]
    weights: Weights
    extra_tensors: Tensors = field(default_factory=dict)
    extra_values: dict[str, JSON] = field(default_factory=dict)
    attacked: bool = False
    """Set by the server on the updates of clients a simulated ``attack`` controls."""

    def move_to(self, device: torch.device) -> None:
        """Put the update's tensors on ``device`` (the server's, before aggregation)."""
        self.weights = to_device(self.weights, device)
        self.extra_tensors = to_device(self.extra_tensors, device)


@dataclass
class SecureSum(ClientUpdate):
    """A secure-aggregation round's unmasked result (``runtime.secure_aggregation``): the
    weighted mean of its ``members``' updates, the only update the server ever sees.

    ``weights`` is that mean (the global weights plus the mean update, in the model's dtype),
    ``num_samples`` the members' total and ``metrics`` their sample-weighted training
    ``accuracy`` and ``loss``. ``update_sum`` is the members' weighted sum of their updates
    (weights minus the global ones) in float64, floating-point tensors only, before any cast
    (what central DP noises). A runtime returns it after the ``ClientFailure`` of each sampled
    client that dropped out; an aggregator given it alone returns ``weights`` as FedAvg would
    the members' updates.
    """

    members: tuple[str, ...] = ()
    update_sum: Weights = field(default_factory=dict)

    def move_to(self, device: torch.device) -> None:
        super().move_to(device)
        self.update_sum = to_device(self.update_sum, device)


@dataclass
class ClientFailure:
    """A sampled client that gave no update this round (raised, died, hung, disconnected).

    Runtimes return it in place of the client's ``ClientUpdate``; the trainer fires
    ``on_client_failure`` with ``error`` and leaves the client out of the round.

    Attributes:
        client_id: the client.
        error: why, in words; the traceback text when its training raised.
        kind: ``raised``, ``died``, ``timeout``, ``disconnected``, ``malformed``, ``busy``.
    """

    client_id: str
    error: str
    kind: str = field(default="failed", compare=False)


Outcome = ClientUpdate | ClientFailure
"""What a runtime returns for each client of a round."""


@dataclass
class RoundResult:
    """One round's outcome, given to ``on_round_end``.

    Attributes:
        round_num: the round number, starting at 1.
        metrics: global-test ``accuracy`` and ``loss`` (on evaluated rounds), sample-weighted
            ``train_accuracy`` and ``train_loss``, ``num_clients``, ``num_samples`` and
            ``round_time`` (seconds); with local test sets (``data.local_test_fraction``), on
            evaluated rounds, ``personal_accuracy``, ``personal_loss`` and the clients' spread
            (``personal_accuracy_min``, ``_p10``, ``_median``, ``personal_clients``),
            ``personal_eval_failed`` (clients left out) and ``personal_eval_time`` (seconds,
            apart from ``round_time``). Callbacks may add
            entries; they are recorded.
        updates: the clients' updates of this round.
    """

    round_num: int
    metrics: dict[str, float]
    updates: list[ClientUpdate] = field(default_factory=list)


@dataclass
class TrainResult:
    """A whole run's outcome, given to ``on_train_end`` and returned by ``oiafed.run``.

    Attributes:
        rounds_completed: how many rounds ran.
        history: one metrics dict per round, each with ``round``.
        stop_reason: ``"completed"`` when every round ran, else why training stopped.
        stopped_by: the callback that set ``trainer.should_stop``, if any.
        callback_errors: the errors callbacks raised (training went on), as dicts.
        run_dir: the run folder, when the run wrote one.
        weights: the final global weights.
    """

    rounds_completed: int
    history: list[dict[str, float]] = field(repr=False)
    stop_reason: str
    stopped_by: str | None
    callback_errors: list[dict[str, Any]]
    weights: Weights = field(repr=False)
    run_dir: Path | None = None
    wall_time: float = 0.0

    def best(self, metric: str = "accuracy", mode: str = "max") -> dict[str, float] | None:
        """The history entry with the best finite ``metric`` (None if no round has it)."""
        rows = [
            row for row in self.history
            if isinstance(row.get(metric), int | float) and math.isfinite(row[metric])
        ]
        if not rows:
            return None
        pick = max if mode == "max" else min
        return pick(rows, key=lambda row: row[metric])

    @property
    def final_metrics(self) -> dict[str, float]:
        """The last round's metrics (empty when no round ran)."""
        return self.history[-1] if self.history else {}


@dataclass(frozen=True)
class RoundContext:
    """What an algorithm's server half knows of the round it configures and aggregates.

    Attributes:
        round_num: the round (from 1).
        sampled: the round's clients, in the order their tasks go out.
        num_clients: clients in the federation (SCAFFOLD's N).
        states: the per-client state the server half keeps (``ClientStates``: resumable).
        stragglers: sampled clients told to do fewer local epochs this round
            (``trainer.args.straggler_fraction``).
        attacked: sampled clients a simulated ``attack`` controls.
        fit_config: the round's settings sent to every learner (``lr``, ...).
        parameter_names: the model's floating-point parameters (``named_parameters``), as
            opposed to its buffers (BatchNorm statistics, counters).
    """

    round_num: int
    sampled: tuple[str, ...]
    num_clients: int
    states: ClientStates
    stragglers: frozenset[str] = frozenset()
    attacked: frozenset[str] = frozenset()
    fit_config: dict[str, JSON] = field(default_factory=dict)
    parameter_names: tuple[str, ...] = ()


@dataclass
class RoundPlan:
    """What a server half sends the round's clients beside the global weights.

    Attributes:
        tensors, values: the same for every sampled client (encoded once per round).
        client_tensors, client_values: client id -> what that client alone receives.
    """

    tensors: Tensors = field(default_factory=dict)
    values: dict[str, JSON] = field(default_factory=dict)
    client_tensors: dict[str, Tensors] = field(default_factory=dict)
    client_values: dict[str, dict[str, JSON]] = field(default_factory=dict)
