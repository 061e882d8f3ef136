"""Tiny fakes to unit-test callbacks without a federated run.

A callback only sees the objects its hooks receive, so a test can build those objects by
hand, call the hooks and check what the callback did. ``FakeTrainer`` is a real ``Trainer``
on a tiny model whose rounds are scripted (no data, no training); ``make_round_result``
builds a ``RoundResult`` with the metrics you choose; ``FakeLearner`` stands in for the
learner in epoch hooks; and ``run_rounds`` drives callbacks through a whole run of the real
round loop (``Trainer.fit``: hook order, ``stopped_by``, error handling and ``on_exception``
behave as in ``oiafed.run``) whose rounds have the metrics you give.

Example:
    >>> import asyncio
    >>> from oiafed.callbacks import EarlyStoppingCallback
    >>> from oiafed.testing import FakeTrainer, make_round_result, run_rounds
    >>> trainer = FakeTrainer(rounds=10)
    >>> stopper = EarlyStoppingCallback(patience=2)
    >>> asyncio.run(stopper.on_round_end(trainer, 1, make_round_result(1, accuracy=0.5)))
    >>> trainer.should_stop
    False
    >>> result = run_rounds([EarlyStoppingCallback(patience=2)],
    ...                     [{"accuracy": a} for a in (0.5, 0.6, 0.6, 0.6, 0.9)])
    >>> result.rounds_completed, result.stopped_by
    (4, 'early_stopping')
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oiafed.callbacks.base import CallbackManager
from oiafed.core.aggregators import Aggregator
from oiafed.core.learner import Learner
from oiafed.core.trainer import Trainer
from oiafed.core.types import (
    ClientTask,
    ClientUpdate,
    Outcome,
    RoundResult,
    RoundTask,
    TrainResult,
    Weights,
)
from oiafed.runtime.base import Runtime

__all__ = [
    "FakeLearner",
    "FakeTrainer",
    "arun_rounds",
    "make_round_result",
    "make_update",
    "run_rounds",
    "tiny_model",
]


def tiny_model(in_features: int = 4, num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A small linear model with fixed initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class ScriptedRuntime(Runtime):
    """Every sampled client answers at once with the global weights unchanged."""

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        return [ClientUpdate(c.client_id, 1, {}, {k: v.clone() for k, v in task.weights.items()})
                for c in clients]


class ScriptedTraining(Aggregator):
    """Runs ``train(trainer, round_num)`` on the global model as the round's "aggregation"."""

    def __init__(self, trainer: FakeTrainer, train: Callable[[FakeTrainer, int], None]) -> None:
        self.trainer = trainer
        self.train = train

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        self.train(self.trainer, self.trainer.round_num)
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}


class FakeTrainer(Trainer):
    """A real ``Trainer`` for callback tests: a tiny model, no data, scripted rounds.

    Attributes (those of the real trainer):
        model: the global model (``tiny_model()`` by default).
        round_num: the current round (0 before the first).
        rounds: the number of rounds planned.
        should_stop, stop_reason, stopped_by: the stop controls.
        fit_config: per-round settings for learners (``{"lr": 0.1}`` by default).
        run_dir: the run folder (None: relative paths resolve in the working directory).
        client_ids: ``client_0`` .. ``client_{n-1}``.
        history: one metrics dict (with ``round``) per finished round.
        client_selection_weights: what a callback asked for the next selection.
        eval_every, config: as on the real trainer.

    Its rounds (``run_rounds``) train nothing: each sampled client answers with the global
    weights, the "aggregation" runs ``fake_train`` (or the ``train`` given to ``run_rounds``),
    and the round's metrics are the next ones of ``script``.
    """

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        rounds: int = 10,
        run_dir: str | Path | None = None,
        num_clients: int = 4,
        lr: float = 0.1,
        fit_config: dict[str, Any] | None = None,
        eval_every: int = 1,
    ) -> None:
        super().__init__(rounds=rounds, eval_every=eval_every)
        self.bind(model=model if model is not None else tiny_model(),
                  aggregator=ScriptedTraining(self, FakeTrainer.fake_train),
                  runtime=ScriptedRuntime(), callbacks=CallbackManager(), test_data=None,
                  client_ids=[f"client_{i}" for i in range(num_clients)], seed=0)
        self.fit_config = dict(fit_config) if fit_config is not None else {"lr": lr}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.script: deque[Mapping[str, Any]] = deque()

    def fake_train(self, round_num: int) -> None:
        """Pretend a round trained the model: every parameter becomes ``float(round_num)``.

        So the weights differ from round to round and a test can tell which round's weights
        a callback kept or saved (they are all ``round_num``).
        """
        with torch.no_grad():
            for param in self.model.parameters():
                param.fill_(float(round_num))

    def round_metrics(self, round_num: int, updates: list[ClientUpdate],
                      started: float) -> dict[str, float]:
        """The next scripted metrics, as given."""
        return dict(self.script.popleft())


def make_update(
    client_id: str = "client_0",
    num_samples: int = 10,
    metrics: Mapping[str, float] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> ClientUpdate:
    """A ``ClientUpdate`` (local ``accuracy``/``loss`` of 0.5/1.0 unless given)."""
    return ClientUpdate(client_id, num_samples,
                        dict(metrics) if metrics is not None else {"accuracy": 0.5, "loss": 1.0},
                        weights if weights is not None else {})


def make_round_result(
    round_num: int = 1,
    metrics: Mapping[str, Any] | None = None,
    *,
    updates: list[ClientUpdate] | None = None,
    **metric_values: Any,
) -> RoundResult:
    """A ``RoundResult`` with exactly the metrics given (as a dict and/or keywords).

    ``make_round_result(3, accuracy=0.9, loss=0.3)``; leave ``accuracy`` and ``loss`` out to
    model a round that ``eval_every`` did not evaluate.
    """
    return RoundResult(round_num, {**(metrics or {}), **metric_values}, list(updates or []))


class FakeLearner(Learner):
    """A ``Learner`` for epoch hooks, with an SGD optimizer over its model and nothing to train.

    Attributes:
        model: the local model; optimizer: an SGD optimizer over it with ``lr``;
        client_id, round_num, epochs, lr, batch_size: as on the real learner.
    """

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        client_id: str = "client_0",
        round_num: int = 1,
        epochs: int = 1,
        lr: float = 0.1,
        batch_size: int = 32,
    ) -> None:
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr)
        self.setup(model if model is not None else tiny_model(), CallbackManager())
        self.client_id = client_id
        self.round_num = round_num
        self.optimizer = self.make_optimizer(lr)


async def arun_rounds(
    callbacks: Iterable[Any],
    round_metrics: Iterable[Mapping[str, Any]],
    *,
    trainer: FakeTrainer | None = None,
    strict: bool = True,
    train: Callable[[FakeTrainer, int], None] | None = None,
    start_round: int | None = None,
) -> TrainResult:
    """Drive ``callbacks`` through a run whose rounds have the metrics given, in order.

    The real round loop runs (``Trainer.fit`` of a ``FakeTrainer``): ``on_train_start``, then
    per round ``on_round_start``, ``on_aggregate_start``, ``train(trainer, round_num)``
    (default ``trainer.fake_train``), ``on_aggregate_end``, ``on_round_end`` with a
    ``RoundResult`` of that round's metrics (callbacks may add to them; the row goes into
    ``trainer.history``), and ``on_train_end``; training stops early when a callback sets
    ``should_stop``. Rounds continue from ``trainer.round_num`` (or ``start_round - 1``),
    which is how a resumed run is modelled. ``strict`` (default) lets a callback's error
    propagate.

    Returns:
        The ``TrainResult`` (``weights``: the model's final weights), as ``on_train_end`` left it.
    """
    trainer = trainer if trainer is not None else FakeTrainer()
    if start_round is not None:
        trainer.round_num = start_round - 1
    plan = list(round_metrics)
    trainer.callbacks = CallbackManager(list(callbacks), strict=strict)
    trainer.aggregator = ScriptedTraining(trainer, train or FakeTrainer.fake_train)
    trainer.script = deque(plan)
    result = await trainer.fit(until=trainer.round_num + len(plan))
    result.weights = {k: v.detach().clone() for k, v in result.weights.items()}
    result.run_dir = trainer.run_dir
    return result


def run_rounds(
    callbacks: Iterable[Any],
    round_metrics: Iterable[Mapping[str, Any]],
    **kwargs: Any,
) -> TrainResult:
    """``arun_rounds`` for synchronous code (tests): runs it with ``asyncio.run``."""
    return asyncio.run(arun_rounds(callbacks, round_metrics, **kwargs))

