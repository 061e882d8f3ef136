"""Stop training before the privacy spent would pass a budget."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from oiafed.callbacks.base import Callback
from oiafed.exceptions import ConfigError
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult

logger = logging.getLogger(__name__)

NAME = "privacy_budget"


@register("callback.privacy_budget")
class PrivacyBudgetCallback(Callback):
    """Stop training before ``epsilon`` would pass ``budget``: before the first round and
    after each round it asks the run's central privacy (``privacy.type: central``) for the
    epsilon the *next* round would reach, and stops when that exceeds the budget, so the
    epsilon of every round run stays within it. The stop reason names both values. A run
    resumed after the stop stops again before training (the privacy section counts the
    rounds released, redone ones included, so the callback keeps no state).

    Args:
        budget: the largest epsilon allowed (at the privacy section's ``target_delta``).

    Raises:
        ConfigError: in ``__init__`` for a budget that is not a finite number > 0; when the
            config is loaded (``check_config``), for a config without central privacy (local
            DP's epsilon is only known after the clients report). A callback added in code to
            a run without central privacy stops it before the first round, saying why.

    Example:
        >>> result = oiafed.run("dp.yaml", callbacks=[PrivacyBudgetCallback(budget=8.0)])
        >>> result.stop_reason
        'privacy_budget: round 13 would reach epsilon ... > budget 8 (... after round 12)'

    YAML:
        callbacks:
          - type: privacy_budget
            args:
              budget: 8.0
    """

    def __init__(self, budget: float) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not (
                math.isfinite(budget) and budget > 0):
            raise ConfigError(f"{NAME}: budget must be a finite number > 0; got {budget!r}")
        self.budget = float(budget)

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Refuse a config whose privacy spent is not known ahead (no central privacy)."""
        if cfg.privacy is None or cfg.privacy.type != "central":
            raise ConfigError(f"{NAME} needs privacy.type: central (the epsilon a round will "
                              f"reach is known before it runs only there); got "
                              f"{None if cfg.privacy is None else cfg.privacy.type!r}",
                              "privacy.type")

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Stop before the first round (or the first of a resumed run) if it would pass."""
        self._check(trainer, trainer.round_num)

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Stop after this round if the next one would pass the budget."""
        self._check(trainer, round_num)

    def _check(self, trainer: Trainer, done: int) -> None:
        privacy = getattr(trainer, "privacy", None)
        upcoming = privacy.epsilon_next() if privacy is not None else None
        if privacy is None or upcoming is None:
            self._stop(trainer, f"{NAME}: the run has no central privacy whose epsilon is "
                                "known ahead; nothing bounds it")
            return
        if done >= trainer.rounds or upcoming <= self.budget:
            return
        spent = privacy.epsilon_spent()
        self._stop(trainer, f"{NAME}: round {done + 1} would reach epsilon {upcoming:.4g} > "
                            f"budget {self.budget:g} ({spent:.4g} after round {done})")

    @staticmethod
    def _stop(trainer: Trainer, reason: str) -> None:
        trainer.should_stop = True
        trainer.stop_reason = reason
        logger.info(reason)
