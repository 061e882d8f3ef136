"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021),
Algorithm 1.

Client k minimises ``L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2`` with
``g_k = grad L_k(theta_k^{t-1})`` (zeros at first), then ``g_k <- g_k - alpha (theta_k^t -
theta^{t-1})``. The server keeps ``h <- h - alpha/m sum_{k in P_t} (theta_k^t - theta^{t-1})``
(m: all clients) and sets ``theta^t = mean_{k in P_t} theta_k^t - h / alpha``.

The server half keeps each ``g_k`` (``RoundContext.states``) and computes its new value from
the client's weights, so the client half returns nothing beside them. Only the model's
floating-point parameters (``RoundContext.parameter_names``) are regularised; buffers (batch
norm's running statistics) take the plain mean of the clients' values and integer buffers the
first client's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from oiafed.algorithms.fedprox import sent_number
from oiafed.algorithms.scaffold import client_parts, floating_parameters
from oiafed.core.aggregators import Aggregator, extras_problem, weighted_average
from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, RoundPlan, Tensors, Weights
from oiafed.device import CPU
from oiafed.exceptions import ConfigError
from oiafed.registry import register

ALPHA = "alpha"
"""The value the server half sends each round: the regulariser's coefficient."""
G = "g/"
"""Prefix of a client's ``g_k`` tensors (as stored in ``RoundContext.states``)."""


@register("aggregator.feddyn")
class FedDyn(Aggregator):
    """FedDyn's server half: keeps ``h`` (saved with the run) and each client's ``g_k``;
    sends ``alpha`` to all and ``g_k`` to its client. Stragglers' partial work is kept.

    Args:
        alpha: the dynamic regulariser's coefficient (the paper uses 0.1, 0.01 and 0.001).

    Raises:
        ConfigError: naming ``aggregator.args.alpha`` when it is not a finite number > 0.

    YAML:
        aggregator:
          type: feddyn
          args: {alpha: 0.01}
    """

    client_half: ClassVar[str | None] = "feddyn"

    def __init__(self, alpha: float = 0.01) -> None:
        if not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"must be a finite number > 0, got {alpha}", "aggregator.args.alpha")
        self.alpha = float(alpha)
        self.h: Tensors = {}
        """Parameter name -> h (float64, CPU; empty: zeros)."""

    def configure_round(self, global_weights: Weights) -> RoundPlan:
        return RoundPlan(values={ALPHA: self.alpha}, client_tensors=client_parts(self))

    def update_problem(self, update: ClientUpdate, global_weights: Weights) -> str | None:
        return extras_problem(update, {})

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        ctx = self.round_context()
        count, alpha = len(updates), self.alpha
        new = weighted_average([u.weights for u in updates], [1.0] * count)
        priors = [ctx.states.get(u.client_id) or {} for u in updates]
        states: list[dict[str, Any]] = [{} for _ in updates]
        for name in ctx.parameter_names:
            x, dtype = global_weights[name].to(torch.float64), global_weights[name].dtype
            total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
            for update, prior_state, state in zip(updates, priors, states, strict=True):
                moved = update.weights[name].to(torch.float64) - x
                total += moved
                prior = prior_state.get(G + name)
                g = -alpha * moved if prior is None else prior.to(x) - alpha * moved
                state[G + name] = g.to(CPU, dtype)
            h = self.h.get(name, torch.zeros(x.shape, dtype=torch.float64)).to(x.device)
            h = h - alpha / ctx.num_clients * total
            new[name] = (x + total / count - h / alpha).to(dtype)
            self.h[name] = h.to(CPU)
        for update, state in zip(updates, states, strict=True):
            ctx.states.put(update.client_id, state)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"h": dict(self.h)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h = {name: t.to(CPU, torch.float64) for name, t in state["h"].items()}


@register("learner.feddyn")
class FedDynLearner(Learner):
    """FedDyn's client half, in the gradient: before each optimizer step
    ``grad += alpha (theta - theta^{t-1}) - g_k`` for every floating-point parameter (the
    gradient of the two added terms). The optimizer's momentum and weight decay (the paper's
    experiments use weight decay) act on top."""

    server_half: ClassVar[str | None] = "feddyn"

    def begin_fit(self) -> None:
        self._alpha = sent_number(self, ALPHA)
        start, sent = self.global_weights, self.extra_tensors
        self._terms = []
        for name, p in floating_parameters(self):
            g = sent.get(G + name)
            self._terms.append((p, start[name], None if g is None else g.to(p.device, p.dtype)))

    def before_optimizer_step(self) -> None:
        for p, start, g in self._terms:
            extra = (p.detach() - start).mul_(self._alpha)
            if g is not None:
                extra.sub_(g)
            if p.grad is None:
                p.grad = extra
            else:
                p.grad.add_(extra)
