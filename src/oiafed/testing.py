"""Tiny fakes to unit-test callbacks without a federated run.

A callback only sees the objects its hooks receive, so a test can build those objects by
hand, call the hooks and check what the callback did. ``FakeTrainer`` has every attribute a
real ``Trainer`` offers callbacks; ``make_round_result`` builds a ``RoundResult`` with the
metrics you choose; ``FakeLearner`` stands in for the learner in epoch hooks; and
``run_rounds`` drives callbacks through a whole training run (through the real
``CallbackManager``, so ``stopped_by`` and error handling behave as in ``oiafed.run``).

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

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oiafed.callbacks.base import CallbackManager
from oiafed.core.types import ClientUpdate, RoundResult, TrainResult

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


class FakeTrainer:
    """Stands in for ``oiafed.Trainer`` in callback hooks: plain attributes, no training.

    Attributes (as on the real trainer):
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
        self.model = model if model is not None else tiny_model()
        self.round_num = 0
        self.rounds = rounds
        self.should_stop = False
        self.stop_reason: str | None = None
        self.stopped_by: str | None = None
        self.fit_config: dict[str, Any] = dict(fit_config) if fit_config is not None else {"lr": lr}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.client_ids = [f"client_{i}" for i in range(num_clients)]
        self.history: list[dict[str, Any]] = []
        self.client_selection_weights: dict[str, float] | None = None
        self.eval_every = eval_every
        self.config: Any = None

    def fake_train(self, round_num: int) -> None:
        """Pretend a round trained the model: every parameter becomes ``float(round_num)``.

        So the weights differ from round to round and a test can tell which round's weights
        a callback kept or saved (they are all ``round_num``).
        """
        with torch.no_grad():
            for param in self.model.parameters():
                param.fill_(float(round_num))


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


class FakeLearner:
    """Stands in for ``oiafed.Learner`` in epoch hooks.

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
        self.model = model if model is not None else tiny_model()
        self.client_id = client_id
        self.round_num = round_num
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)


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

    Per round: ``on_round_start``, ``train(trainer, round_num)`` (default
    ``trainer.fake_train``), ``on_round_end`` with a ``RoundResult`` of that round's metrics
    (callbacks may add to them), then the row goes into ``trainer.history``; training stops
    early when a callback sets ``should_stop``. ``on_train_start`` and ``on_train_end`` wrap
    it all. Rounds continue from ``trainer.round_num`` (or ``start_round - 1``), which is how
    a resumed run is modelled. ``strict`` (default) lets a callback's error propagate.

    Returns:
        The ``TrainResult`` (``weights``: the model's final weights), as ``on_train_end`` left it.
    """
    trainer = trainer if trainer is not None else FakeTrainer()
    if start_round is not None:
        trainer.round_num = start_round - 1
    plan = list(round_metrics)
    manager = CallbackManager(list(callbacks), strict=strict)
    train = train or (lambda t, r: t.fake_train(r))
    await manager.on_train_start(trainer)
    for metrics in plan:
        if trainer.should_stop:
            break
        round_num = trainer.round_num + 1
        trainer.round_num = round_num
        await manager.on_round_start(trainer, round_num)
        train(trainer, round_num)
        result = make_round_result(round_num, metrics)
        await manager.on_round_end(trainer, round_num, result)
        trainer.history.append({"round": round_num, **result.metrics})
    if trainer.should_stop:
        reason = trainer.stop_reason or f"should_stop set by {trainer.stopped_by or 'user code'}"
    else:
        reason = "completed"
    result = TrainResult(
        rounds_completed=trainer.round_num,
        history=trainer.history,
        stop_reason=reason,
        stopped_by=trainer.stopped_by if trainer.should_stop else None,
        callback_errors=[e.to_dict() for e in manager.errors],
        weights={k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        run_dir=trainer.run_dir,
    )
    await manager.on_train_end(trainer, result)
    result.callback_errors = [e.to_dict() for e in manager.errors]
    return result


def run_rounds(
    callbacks: Iterable[Any],
    round_metrics: Iterable[Mapping[str, Any]],
    **kwargs: Any,
) -> TrainResult:
    """``arun_rounds`` for synchronous code (tests): runs it with ``asyncio.run``."""
    import asyncio

    return asyncio.run(arun_rounds(callbacks, round_metrics, **kwargs))

