"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020), Eq. (6)-(7), with ``a_i`` of local SGD (Section 4).

Client i's update is ``x - y_i = eta G_i a_i``; the server normalises it by ``||a_i||_1``:
``d_i = (x - y_i) / ||a_i||_1``, ``tau_eff = sum_i p_i ||a_i||_1`` (``p_i = n_i / n`` over the
round's clients) and ``x <- x - tau_eff sum_i p_i d_i``. For plain SGD ``||a_i||_1 = tau_i``
(the steps taken); with local momentum rho (Section 4 and the appendix; as the authors' code)
``||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)``. When every client takes
the same number of steps this is FedAvg.

Only the model's floating-point parameters (``RoundContext.parameter_names``) are normalised;
buffers (batch norm's running statistics) take FedAvg's average, integer buffers the largest
client's. A client with samples that took no step (``||a_i||_1 = 0``: a 16-mixed gradient
scaler skipped them all), for which the paper leaves ``d_i`` undefined, gets ``d_i = 0`` and
keeps its ``p_i`` (a warning names how many there were).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from oiafed.core.aggregators import Aggregator, buffers, extras_problem, weighted_average
from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, Weights
from oiafed.exceptions import ConfigError
from oiafed.registry import register

A_NORM = "a_norm"
"""The value a client returns: ``||a_i||_1`` of its local training."""

logger = logging.getLogger(__name__)


def a_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` of ``steps`` local SGD steps with heavy-ball ``momentum`` (PyTorch's SGD,
    no dampening): the sum over steps k of ``(1 - rho^(tau - k)) / (1 - rho)``."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


@register("aggregator.fednova")
class FedNova(Aggregator):
    """FedNova's server half: normalised averaging of the clients' updates by the ``a_norm``
    its client half ``learner.fednova`` reports; stragglers' partial work is kept.

    YAML:
        aggregator:
          type: fednova
    """

    client_half: ClassVar[str | None] = "fednova"

    def update_problem(self, update: ClientUpdate, global_weights: Weights) -> str | None:
        problem = extras_problem(update, {}, values=(A_NORM,))
        if problem is None:
            norm = update.extra_values[A_NORM]
            if norm < 0:  # 0: no step taken (no samples, or a 16-mixed scaler skipped them)
                return f"extra value {A_NORM!r} must be >= 0, got {norm}"
        return problem

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        names = self.round_context().parameter_names
        sizes = [u.num_samples for u in updates]
        new = weighted_average(buffers(updates, names), sizes)  # raises for no samples
        total = sum(sizes)
        kept = [(u, n / total, float(u.extra_values[A_NORM]))
                for u, n in zip(updates, sizes, strict=True) if n > 0]
        tau_eff = sum(p * norm for _, p, norm in kept)
        moved = [(u, p, norm) for u, p, norm in kept if norm > 0]  # no step: no direction
        if len(moved) < len(kept):
            logger.warning("fednova: %d client(s) with samples took no optimizer step "
                           "(a_norm 0): no direction from them this round",
                           len(kept) - len(moved))
        for name in names:
            x = global_weights[name].to(torch.float64)
            step = sum(p / norm * (x - u.weights[name].to(torch.float64)) for u, p, norm in moved)
            new[name] = (x - tau_eff * step).to(global_weights[name].dtype)
        return new


@register("learner.fednova")
class FedNovaLearner(Learner):
    """FedNova's client half: trains as the default learner and returns ``a_norm``
    (``||a_i||_1`` of its steps and momentum).

    Raises:
        ConfigError: from ``fit``, naming ``learner.args.optimizer`` for an optimizer other
            than SGD, or ``learner.args.momentum`` for momentum >= 1 (``a_i`` is that of SGD).
    """

    server_half: ClassVar[str | None] = "fednova"
    extras_under_dp: ClassVar[bool] = True  # a_norm: a function of the step count alone

    def begin_fit(self) -> None:
        if self.optimizer_name != "sgd":
            raise ConfigError(f"fednova normalises SGD's updates; got {self.optimizer_name!r}",
                              "learner.args.optimizer")
        if self.momentum >= 1:
            raise ConfigError(f"fednova needs momentum < 1, got {self.momentum}",
                              "learner.args.momentum")

    def end_fit(self, update: ClientUpdate) -> None:
        update.extra_values[A_NORM] = a_norm(self.steps, self.momentum)
