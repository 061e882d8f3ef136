"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each client minimises ``h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2`` (Eq. (2), Algorithm 2);
the server averages like FedAvg and keeps the partial work of stragglers (Algorithm 2's
gamma-inexact solutions: devices may do variable amounts of work).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from oiafed.core.aggregators import FedAvg
from oiafed.core.learner import Learner
from oiafed.core.types import RoundPlan, Weights
from oiafed.exceptions import ConfigError
from oiafed.registry import register

MU = "mu"
"""The value the server half sends each round: the proximal coefficient."""


def sent_number(learner: Learner, name: str) -> float:
    """The number ``name`` the server half sent ``learner`` this round.

    Raises:
        RuntimeError: when it is missing (the learner was used without its server half).
    """
    value = learner.extra_values.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RuntimeError(f"{type(learner).__name__} needs the number {name!r} its server half "
                           f"sends each round; got {value!r}")
    return float(value)


@register("aggregator.fedprox")
class FedProx(FedAvg):
    """FedProx's server half: FedAvg's aggregation (stragglers kept, ``drop_stragglers``
    False), sending ``mu`` to its client half ``learner.fedprox`` each round.

    Args:
        mu: the proximal coefficient (the paper tunes it in {0.001, 0.01, 0.1, 1}).
        weighted, drop_stragglers: as ``fedavg``.

    Raises:
        ConfigError: naming ``aggregator.args.mu`` when it is negative or not finite.

    YAML:
        aggregator:
          type: fedprox
          args: {mu: 0.01}
    """

    client_half: ClassVar[str | None] = "fedprox"

    def __init__(self, mu: float = 0.01, weighted: bool = True,
                 drop_stragglers: bool = False) -> None:
        if not math.isfinite(mu) or mu < 0:
            raise ConfigError(f"must be a finite number >= 0, got {mu}", "aggregator.args.mu")
        super().__init__(weighted=weighted, drop_stragglers=drop_stragglers)
        self.mu = float(mu)

    def configure_round(self, global_weights: Weights) -> RoundPlan:
        return RoundPlan(values={MU: self.mu})


@register("learner.fedprox")
class FedProxLearner(Learner):
    """FedProx's client half: the loss plus ``mu/2 ||w - w^t||^2`` over the model's
    floating-point parameters (``w^t``: the round's global weights; buffers are not in it).
    With ``mu = 0`` it trains exactly as the default learner."""

    server_half: ClassVar[str | None] = "fedprox"

    def begin_fit(self) -> None:
        self._mu = sent_number(self, MU)
        self._pairs = ([] if self._mu == 0 else [
            (p, self.global_weights[name]) for name, p in self._require_model().named_parameters()
            if p.is_floating_point()])

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = super().training_step(x, y)
        if self._pairs:
            prox = sum((p - start).pow(2).sum() for p, start in self._pairs)
            loss = loss + self._mu / 2 * prox
        return loss, logits
