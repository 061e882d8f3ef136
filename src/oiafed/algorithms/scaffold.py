"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), Algorithm 1 with option II for the clients' control variates.

Client i (lines 7-13): ``y_i <- y_i - eta_l (g_i(y_i) - c_i + c)`` for K steps, then
``c_i+ = c_i - c + (x - y_i) / (K eta_l)``; it returns ``y_i`` and ``delta_c_i = c_i+ - c_i``.
Server (lines 16-17): ``x <- x + eta_g mean_i(y_i - x)``, ``c <- c + |S|/N mean_i(delta_c_i)``.

Control variates exist for the model's floating-point parameters only (``named_parameters``,
which the server half reads from ``RoundContext.parameter_names``); buffers (batch norm's
running statistics) take the plain mean of the clients' values and integer buffers the first
client's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from oiafed.core.aggregators import Aggregator, buffers, extras_problem, weighted_average
from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, RoundPlan, Tensors, Weights
from oiafed.device import CPU, accumulator_dtype
from oiafed.exceptions import ConfigError
from oiafed.registry import register

C = "c/"
"""Prefix of the global control variate's tensors, sent to every client."""
C_I = "c_i/"
"""Prefix of a client's own control variate's tensors (as stored in ``RoundContext.states``)."""


def floating_parameters(learner: Learner) -> list[tuple[str, torch.nn.Parameter]]:
    """The learner's model's floating-point ``named_parameters``."""
    return [(name, p) for name, p in learner._require_model().named_parameters()
            if p.is_floating_point()]


def client_parts(aggregator: Aggregator) -> dict[str, Tensors]:
    """Each sampled client's stored state, for those that have one (``RoundPlan``'s
    ``client_tensors``: a client with none gets nothing and takes zeros)."""
    ctx = aggregator.round_context()
    parts = {}
    for client_id in ctx.sampled:
        state = ctx.states.get(client_id)
        if state is not None:
            parts[client_id] = state
    return parts


@register("aggregator.scaffold")
class Scaffold(Aggregator):
    """SCAFFOLD's server half: keeps the global control variate ``c`` (saved with the run)
    and each client's ``c_i`` (``RoundContext.states``); every round it sends ``c`` to all
    and ``c_i`` to its client, and averages without weights, as the paper does.

    Args:
        server_lr: the global step size eta_g (the paper's default and analysis: 1).

    Raises:
        ConfigError: naming ``aggregator.args.server_lr`` when it is not a finite number > 0.

    YAML:
        aggregator:
          type: scaffold
          args: {server_lr: 1.0}
    """

    client_half: ClassVar[str | None] = "scaffold"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not math.isfinite(server_lr) or server_lr <= 0:
            raise ConfigError(f"must be a finite number > 0, got {server_lr}",
                              "aggregator.args.server_lr")
        self.server_lr = float(server_lr)
        self.c: Tensors = {}
        """Parameter name -> the global control variate (float64, CPU; empty: zeros)."""

    def configure_round(self, global_weights: Weights) -> RoundPlan:
        tensors = {C + name: c.to(global_weights[name].dtype) for name, c in self.c.items()}
        return RoundPlan(tensors=tensors, client_tensors=client_parts(self))

    def update_problem(self, update: ClientUpdate, global_weights: Weights) -> str | None:
        return extras_problem(update, {name: global_weights[name].shape
                                       for name in self.round_context().parameter_names})

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        ctx = self.round_context()
        count = len(updates)
        new = weighted_average(buffers(updates, ctx.parameter_names), [1.0] * count)
        priors = [ctx.states.get(u.client_id) or {} for u in updates]
        states: list[dict[str, Any]] = [{} for _ in updates]
        for name in ctx.parameter_names:
            x = global_weights[name].to(torch.float64)
            mean = sum(u.weights[name].to(torch.float64) for u in updates) / count
            new[name] = (x + self.server_lr * (mean - x)).to(global_weights[name].dtype)
            c = self.c.get(name, torch.zeros(x.shape, dtype=torch.float64))
            total = torch.zeros(x.shape, dtype=torch.float64)
            for update, prior_state, state in zip(updates, priors, states, strict=True):
                delta = update.extra_tensors[name].to(CPU, torch.float64)
                total += delta
                prior = prior_state.get(C_I + name)
                c_i = delta if prior is None else prior.to(CPU, torch.float64) + delta
                state[C_I + name] = c_i.to(global_weights[name].dtype, copy=True)
            self.c[name] = c + total / ctx.num_clients
        for update, state in zip(updates, states, strict=True):
            ctx.states.put(update.client_id, state)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"c": dict(self.c)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = {name: t.to(CPU, torch.float64) for name, t in state["c"].items()}


@register("learner.scaffold")
class ScaffoldLearner(Learner):
    """SCAFFOLD's client half: each gradient gets ``c - c_i`` added before the optimizer step;
    the update carries ``delta_c_i = (x - y_i) / (K lr) - c`` (option II) per parameter, with
    K the optimizer steps taken and lr the round's rate (``round_lr``; a callback that changes
    it within the round is not accounted for).

    SCAFFOLD assumes plain SGD: with momentum or weight decay the optimizer applies them on top
    of the corrected gradient, and option II then measures the update they made.
    """

    server_half: ClassVar[str | None] = "scaffold"

    def begin_fit(self) -> None:
        sent = self.extra_tensors
        self._params = floating_parameters(self)
        self._c: dict[str, torch.Tensor] = {}
        self._corrections: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        wide = accumulator_dtype(self.device)
        for name, p in self._params:
            c, c_i = sent.get(C + name), sent.get(C_I + name)
            if c is not None:
                self._c[name] = c.to(p.device, wide)
            if c is None and c_i is None:
                continue
            correction = torch.zeros_like(p, dtype=wide)
            if c is not None:
                correction += c.to(p.device, wide)
            if c_i is not None:
                correction -= c_i.to(p.device, wide)
            self._corrections.append((p, correction.to(p.dtype)))

    def before_optimizer_step(self) -> None:
        for p, correction in self._corrections:
            if p.grad is None:
                p.grad = correction.clone()
            else:
                p.grad.add_(correction)

    def end_fit(self, update: ClientUpdate) -> None:
        start, wide = self.global_weights, accumulator_dtype(self.device)
        for name, p in self._params:
            if self.steps == 0:  # no step, no estimate: c_i stays
                delta = torch.zeros_like(p, dtype=wide)
            else:
                delta = ((start[name].to(wide) - p.detach().to(wide))
                         / (self.steps * self.round_lr))
                if name in self._c:
                    delta -= self._c[name]
            update.extra_tensors[name] = delta.to(CPU, p.dtype)
