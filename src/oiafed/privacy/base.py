"""What a ``privacy:`` section plugs into: the server's round (``Privacy``) and, for
sample-level DP, the learner's training (``PrivateTraining``).

Both kinds are built from the config's top-level ``privacy:`` section (``type: central`` or
``type: local``); the heavy libraries (dp-accounting, Opacus) are imported on first use, with
an error naming the ``oiafed[privacy]`` extra when they are missing.
"""

from __future__ import annotations

import importlib
import logging
import math
import secrets
from abc import ABC
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from torch import nn

from oiafed.core.types import JSON, ClientUpdate, Outcome, Weights
from oiafed.exceptions import ConfigError

if TYPE_CHECKING:
    import torch

    from oiafed.config import ExperimentConfig
    from oiafed.core.learner import Learner
    from oiafed.data.arrays import ArrayDataset

logger = logging.getLogger(__name__)

EXTRA = "pip install oiafed[privacy]"


def require(module: str) -> ModuleType:
    """Import ``module`` (``opacus``, ``dp_accounting``) of the ``privacy`` extra.

    Raises:
        ConfigError: naming ``privacy.type`` and the extra to install when it is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"differential privacy needs the {module} package, which is not "
                          f"installed ({exc}): {EXTRA}", "privacy.type") from None


def checked_number(value: float, key: str, *, zero: bool = False) -> float:
    """``value`` as a float when it is finite and > 0 (>= 0 with ``zero``).

    Raises:
        ConfigError: naming ``privacy.args.<key>`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"must be a finite number {'>=' if zero else '>'} 0, got {value!r}",
                          f"privacy.args.{key}")
    return float(value)


def checked_secure_rng(cfg: ExperimentConfig) -> None:
    """Refuse a gRPC deployment that does not say where its noise comes from.

    With ``privacy.args.secure_rng: false`` (the default) the noise and the sampling derive
    from the config's ``seed``: anyone who has the config can redraw and subtract the noise,
    so the epsilon reported holds only against whoever does not (a simulation's default, as
    it keeps runs reproducible). ``runtime.mode: grpc`` is a deployment: it must set
    ``secure_rng`` (true: noise and sampling from the OS CSPRNG; false: seed-derived noise,
    for tests, with a warning), as a default that changed with the runtime would make the
    same config mean another thing there.

    Raises:
        ConfigError: naming ``privacy.args.secure_rng`` when it is not a boolean or gRPC
            leaves it out.
    """
    assert cfg.privacy is not None
    value = cfg.privacy.args.get("secure_rng")
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {value!r}", "privacy.args.secure_rng")
    if cfg.runtime.mode != "grpc":
        return
    if value is None:
        raise ConfigError(
            "runtime.mode grpc is a deployment: say where the DP noise comes from. true: the "
            "OS CSPRNG (not reproducible; epsilon holds against whoever has the config); "
            "false: the config's seed (reproducible; anyone with the seed can remove the "
            "noise, so for tests only)", "privacy.args.secure_rng")
    if not value:
        logger.warning("privacy.args.secure_rng is false under runtime.mode grpc: the DP noise "
                       "derives from the config's seed, and whoever has it can remove the noise "
                       "(the epsilon reported does not hold against them)")


def secure_seed() -> int:
    """A 63-bit seed from the OS CSPRNG (``secrets``): for ``privacy.args.secure_rng``."""
    return secrets.randbits(63)


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
    trainer then refuses ``client_selection_weights``); ``secure_rng`` that the noise and
    that sampling come from the OS CSPRNG rather than the seed (``checked_secure_rng``).
    """

    uniform_sampling = False
    secure_rng = False

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

    def update_problem(self, update: ClientUpdate) -> str | None:
        """Why ``update`` cannot be accounted for (the trainer leaves it out), or None."""
        return None

    def prepare(self, round_num: int, updates: list[ClientUpdate],
                global_weights: Weights) -> list[ClientUpdate]:
        """What the aggregator gets in place of the round's accepted ``updates``."""
        return updates

    def round_metrics(self, round_num: int) -> dict[str, float]:
        """What the round adds to its metrics (``epsilon``, ...)."""
        return {}

    def epsilon_next(self) -> float | None:
        """The epsilon the run will have spent after its next round (None: unknown before
        the clients report)."""
        return None

    def epsilon_spent(self) -> float | None:
        """The epsilon spent by the rounds released so far (None: unknown ahead)."""
        return None

    def count_released(self, rows: Sequence[dict[str, JSON]],
                       client_rows: Iterable[dict[str, JSON]]) -> None:
        """On resume, before the rows of the rounds to redo are dropped: ``rows`` are every
        round row ``metrics.jsonl`` holds (those rounds were released), ``client_rows`` the
        ``clients.jsonl`` rows of the rounds to redo (those updates were sent)."""

    def state_dict(self) -> dict[str, JSON]:
        """JSON-able state saved with the run."""
        return {}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        """Restore what ``state_dict`` returned."""
