"""MOON (Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021, Algorithm 1).

A client's loss is ``l_sup + mu * l_con`` (Eq. 4), with the model-contrastive term (Eq. 3)

    l_con = -log( exp(sim(z, z_glob) / tau) / (exp(sim(z, z_glob) / tau) + exp(sim(z, z_prev) / tau)) )

where ``z``, ``z_glob`` and ``z_prev`` are the representations of a minibatch by the model being
trained, the round's global model and the client's model of its previous round, and ``sim`` is
the cosine similarity. The representation is the input of the model's head (the submodule
``aggregator.args.head``; the paper's projection-head output, here the body's output). A client
with no previous model yet uses the global model (``l_con`` is then constant). The paper's
defaults: ``tau = 0.5``; ``mu = 5`` on CIFAR-10, 1 on CIFAR-100 and Tiny-ImageNet (default 1).

The server averages as FedAvg and keeps each client's trained model (``RoundContext.states``)
for its next round. MOON trains a global model: a client's personal model is the global one.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from oiafed.algorithms.fedprox import sent_number
from oiafed.algorithms.personal import (
    HEAD_KEY,
    PersonalAggregator,
    load_personal,
    part_keys,
    personal_tensors,
)
from oiafed.core.learner import Learner
from oiafed.core.types import JSON, RoundPlan, Weights
from oiafed.core.weights import load_weights
from oiafed.exceptions import ConfigError
from oiafed.registry import register

MU, TEMPERATURE, HEAD = "mu", "temperature", "head"


@register("aggregator.moon")
class Moon(PersonalAggregator):
    """MOON's server half: FedAvg, keeping each client's trained model for its next round.

    Args:
        mu: weight of the model-contrastive term (default 1).
        temperature: tau (the paper's 0.5).
        head: the model's head submodule, whose input is the representation.
        weighted, drop_stragglers: as ``fedavg``.

    Raises:
        ConfigError: naming ``aggregator.args.mu``/``temperature`` (mu negative, tau not > 0)
            or ``aggregator.args.head`` (no such submodule).

    YAML:
        aggregator: {type: moon, args: {mu: 1.0, temperature: 0.5}}
    """

    client_half: ClassVar[str | None] = "moon"

    def __init__(self, mu: float = 1.0, temperature: float = 0.5, head: str = "head",
                 weighted: bool = True, drop_stragglers: bool = False) -> None:
        if not math.isfinite(mu) or mu < 0:
            raise ConfigError(f"must be a finite number >= 0, got {mu}", "aggregator.args.mu")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"must be a finite number > 0, got {temperature}",
                              "aggregator.args.temperature")
        super().__init__(weighted=weighted, drop_stragglers=drop_stragglers)
        self.mu, self.temperature, self.head = float(mu), float(temperature), head

    def check_model(self, model: nn.Module) -> None:
        part_keys(model, [self.head], HEAD_KEY)
        self.personal_keys = tuple(k for k, t in model.state_dict().items()
                                   if t.is_floating_point())

    def sent_values(self) -> dict[str, JSON]:
        return {MU: self.mu, TEMPERATURE: self.temperature, HEAD: self.head}

    def evaluation_plan(self, global_weights: Weights) -> RoundPlan:
        return RoundPlan()


class _Representation:
    """A model copy (no gradients) and the input its head last received."""

    def __init__(self, model: nn.Module, head: str) -> None:
        self.model = model
        self.z = torch.empty(0)
        model.get_submodule(head).register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.z = inputs[0].flatten(1)


@register("learner.moon")
class MoonLearner(Learner):
    """MOON's client half: the loss of Eq. (4); its previous model arrives as personal
    tensors (the model itself trains from the global weights). Evaluated with the global
    model."""

    server_half: ClassVar[str | None] = "moon"

    def begin_fit(self) -> None:
        model, head = self._require_model(), str(self.extra_values.get(HEAD))
        self._mu, self._tau = sent_number(self, MU), sent_number(self, TEMPERATURE)
        if getattr(self, "_head_name", None) != head:  # once: copies made before any hook
            self._head_name = head
            self._glob = _Representation(self._frozen_copy(model), head)
            self._prev = _Representation(self._frozen_copy(model), head)
            self._own = _Representation(model, head)
        load_weights(self._glob.model, self.global_weights)
        load_weights(self._prev.model, self.global_weights)
        load_personal(self._prev.model, personal_tensors(self.extra_tensors))

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        clone = copy.deepcopy(model).eval()
        clone.requires_grad_(False)
        return clone

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._require_model()(x)
        z = self._own.z
        with torch.no_grad():
            self._glob.model(x)
            self._prev.model(x)
        positive = F.cosine_similarity(z, self._glob.z, dim=1) / self._tau
        negative = F.cosine_similarity(z, self._prev.z, dim=1) / self._tau
        contrastive = -torch.log_softmax(torch.stack([positive, negative], dim=1), dim=1)[:, 0]
        return self.loss(logits, y) + self._mu * contrastive.mean(), logits
