"""What a ``privacy:`` section plugs into: the server's round (``Privacy``) and, for
sample-level DP, the learner's training (``PrivateTraining``).

Both kinds are built from the config's top-level ``privacy:`` section (``type: central`` or
``type: local``); the heavy libraries (dp-accounting, Opacus) are imported on first use, with
an error naming the ``oiafed[privacy]`` extra when they are missing.
"""

from __future__ import annotations

import importlib
from abc import ABC
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from oiafed.core.types import ClientUpdate, Outcome, Weights
from oiafed.exceptions import ConfigError

if TYPE_CHECKING:
    import torch

    from oiafed.config import ExperimentConfig
    from oiafed.core.learner import Learner
    from oiafed.data.arrays import ArrayDataset

EXTRA = "pip install oiafed[privacy]"


def require(module: str) -> Any:
    """Import ``module`` (``opacus``, ``dp_accounting``) of the ``privacy`` extra.

    Raises:
        ConfigError: naming ``privacy.type`` and the extra to install when it is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"differential privacy needs the {module} package, which is not "
                          f"installed ({exc}): {EXTRA}", "privacy.type") from None


class PrivateTraining(Protocol):
    """The client side of sample-level DP, run inside ``Learner.fit``."""

    def begin(self, learner: Learner, seed: int, num_samples: int) -> None:
        """Before the first epoch (``seed``: the fit's, ``num_samples``: the client's data
        size): make ``learner.optimizer`` private."""

    def train_epoch(self, learner: Learner, data: ArrayDataset,
                    generator: torch.Generator) -> dict[str, float]:
        """One private epoch in place of ``Learner.train_epoch``; its mean loss and accuracy."""

    def end(self, learner: Learner, update: ClientUpdate) -> None:
        """After the last epoch: report what the accountant needs in ``update.metrics``."""


class Privacy(ABC):  # noqa: B024 - every hook is optional, as a callback's
    """The server side of a ``privacy:`` section: it sees each round's outcomes and updates
    and adds the privacy spent to the round's metrics.

    ``uniform_sampling`` says the accountant assumes the trainer's uniform sampling (the
    trainer then refuses ``client_selection_weights``).
    """

    uniform_sampling = False

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Refuse a config this kind of privacy cannot make private (``ConfigError`` naming
        ``privacy.type`` and the key at fault); called when the config is loaded."""

    def check_model(self, model: nn.Module, model_type: str) -> None:
        """Refuse a model this kind cannot train privately (``ConfigError`` naming
        ``model.type``)."""

    def bind(self, num_clients: int, num_sampled: int, seed: int) -> None:
        """The federation's size, the clients sampled per round and the run's seed."""

    def client_training(self) -> PrivateTraining | None:
        """What the learners run (None: they train as usual)."""
        return None

    def observe(self, round_num: int, outcomes: Sequence[Outcome]) -> None:
        """The round's outcomes as the clients sent them (before any is left out)."""

    def prepare(self, round_num: int, updates: list[ClientUpdate],
                global_weights: Weights) -> list[ClientUpdate]:
        """What the aggregator gets in place of the round's accepted ``updates``."""
        return updates

    def round_metrics(self, round_num: int) -> dict[str, float]:
        """What the round adds to its metrics (``epsilon``, ...)."""
        return {}

    def epsilon_after(self, rounds: int) -> float | None:
        """The epsilon the run would have spent after ``rounds`` rounds (None: unknown
        before the clients report)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved with the run."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
