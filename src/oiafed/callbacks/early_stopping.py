"""Stop training when a monitored metric stops improving."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from oiafed.callbacks._helpers import (
    MODES,
    check_choice,
    check_float,
    check_int,
    check_metric_name,
    is_better,
    load_monitor_state,
    missing_metric_message,
    monitor_state,
    monitored_value,
)
from oiafed.callbacks.base import Callback
from oiafed.exceptions import ConfigError
from oiafed.registry import register

if TYPE_CHECKING:
    from torch import nn

    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult, TrainResult, Weights

logger = logging.getLogger(__name__)

NAME = "early_stopping"


@register("callback.early_stopping")
class EarlyStoppingCallback(Callback):
    """Stop training when ``metric`` has not improved for ``patience`` evaluated rounds.

    A round improves when its ``result.metrics[metric]`` beats the best value so far by more
    than ``min_delta`` (higher for ``mode="max"``, lower for ``"min"``); the first evaluated
    round always improves. Rounds without the metric (those ``eval_every`` skips) are left
    out: they neither improve nor count. Once ``patience`` evaluated rounds in a row have not
    improved, and the round number is at least ``min_rounds``, the callback sets
    ``trainer.should_stop`` and explains why in ``trainer.stop_reason``. A non-finite value
    (NaN, inf: training diverged) stops training at once, whatever ``min_rounds`` says.

    Args:
        patience: evaluated rounds without improvement before stopping (0 behaves like 1).
        metric: the round metric to watch (``accuracy``, ``loss``, ``train_loss``, or one a
            callback listed earlier adds).
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        min_delta: the margin (>= 0) by which a value must beat the best to count as better.
        restore_best_weights: keep a copy of the global model's weights at the best round
            (also in the run's saved state, so a resumed run has it) and, when training ends,
            load them into ``trainer.model`` and ``result.weights``, so the run ends with the
            best round's model.
        min_rounds: never stop before this round (a warm-up); 0 means no warm-up.

    Raises:
        ConfigError: in ``__init__`` for a bad argument (naming it and the valid options);
            in ``on_round_end`` when an evaluated round lacks ``metric`` (listing the metrics
            it has); in ``on_train_end`` when no round ever had the metric.

    State (``state_dict``): ``best``, ``best_round``, ``counter`` and whether the metric was
    seen. The best weights are not part of it (they are tensors, not JSON): after a resume
    they are known again only once a new best round occurs.

    Example:
        >>> stopper = EarlyStoppingCallback(patience=3, metric="loss", mode="min")
        >>> result = oiafed.run("config.yaml", callbacks=[stopper])
        >>> result.stop_reason
        'early_stopping: loss did not improve for 3 rounds (best 0.2314 at round 12)'

    YAML:
        callbacks:
          - type: early_stopping
            args:
              patience: 10
              metric: accuracy
              mode: max
              min_delta: 0.0
              restore_best_weights: false
              min_rounds: 0
    """

    def __init__(
        self,
        patience: int = 10,
        metric: str = "accuracy",
        mode: str = "max",
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
        min_rounds: int = 0,
    ) -> None:
        self.patience = check_int(NAME, "patience", patience, 0)
        self.metric = check_metric_name(NAME, metric)
        self.mode = check_choice(NAME, "mode", mode, MODES)
        self.min_delta = check_float(NAME, "min_delta", min_delta, minimum=0.0)
        if not isinstance(restore_best_weights, bool):
            raise ConfigError(f"{NAME}: restore_best_weights must be true or false; "
                              f"got {restore_best_weights!r}")
        self.restore_best_weights = restore_best_weights
        self.min_rounds = check_int(NAME, "min_rounds", min_rounds, 0)
        self.best: float | None = None
        self.best_round: int | None = None
        self.counter = 0
        self.seen_metric = False
        self.stopped_round: int | None = None
        self.best_weights: Weights | None = None

    def _is_improvement(self, current: float) -> bool:
        return is_better(current, self.best, self.mode, self.min_delta)

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Update the best value and the counter; stop when patience has run out."""
        current = monitored_value(NAME, result.metrics, self.metric)
        if current is None:  # a round without evaluation
            return
        self.seen_metric = True
        if not math.isfinite(current):
            self._stop(trainer, round_num,
                       f"{NAME}: {self.metric} is {current} at round {round_num} (not finite)")
            return
        if self._is_improvement(current):
            self.best, self.best_round, self.counter = current, round_num, 0
            model: nn.Module | None = getattr(trainer, "model", None)
            if self.restore_best_weights and model is not None:
                self.best_weights = {k: v.detach().to("cpu", copy=True)
                                     for k, v in model.state_dict().items()}
            return
        self.counter += 1
        if self.counter >= max(self.patience, 1) and round_num >= self.min_rounds:
            self._stop(trainer, round_num,
                       f"{NAME}: {self.metric} did not improve for {self.counter} rounds "
                       f"(best {self.best:.6g} at round {self.best_round})")

    def _stop(self, trainer: Trainer, round_num: int, reason: str) -> None:
        self.stopped_round = round_num
        trainer.should_stop = True
        trainer.stop_reason = reason
        logger.info(reason)

    async def on_train_end(self, trainer: Trainer, result: TrainResult, **kwargs: Any) -> None:
        """Load the best round's weights (``restore_best_weights``); check the metric was seen."""
        if self.restore_best_weights:
            if self.best_weights is not None:
                model: nn.Module | None = getattr(trainer, "model", None)
                if model is not None:
                    model.load_state_dict(self.best_weights)
                result.weights = {k: v.clone() for k, v in self.best_weights.items()}
                logger.info("%s: restored the weights of round %s (%s=%.6g)", NAME,
                            self.best_round, self.metric, self.best)
            elif self.best_round is not None:
                logger.warning("%s: the weights of the best round %s were not kept in this "
                               "process (a resumed run); the final weights are the last "
                               "round's", NAME, self.best_round)
        rounds = getattr(result, "rounds_completed", 0)
        if not self.seen_metric and rounds:
            history = getattr(result, "history", None) or [{}]
            raise ConfigError(missing_metric_message(NAME, self.metric, history[-1]))

    def state_dict(self) -> dict[str, Any]:
        """Progress: best value and round, the counter; with ``restore_best_weights`` also the
        best weights (tensors, which the run's state file stores as tensors)."""
        state = {
            **monitor_state(self),
            "counter": self.counter,
            "seen_metric": self.seen_metric,
            "stopped_round": self.stopped_round,
        }
        if self.restore_best_weights and self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output (of a callback watching the same metric)."""
        load_monitor_state(NAME, self, state)
        self.counter = int(state.get("counter", 0))
        self.seen_metric = bool(state.get("seen_metric", self.best is not None))
        self.stopped_round = state.get("stopped_round")
        saved = state.get("best_weights")
        self.best_weights = {k: v.clone() for k, v in saved.items()} if saved else None
