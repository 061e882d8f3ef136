"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, Algorithm 1).

Each client k trains two models from the round's global model w^t: the global one by local
SGD, as in FedAvg (lines 4-5: its update is averaged), and its personal model v_k on the
objective of Eq. (2), ``h_k(v; w^t) = F_k(v) + lambda/2 ||v - w^t||^2``, for the learner's
``epochs`` (or ``personal_epochs``; a straggler's fewer) over its data (lines 6-7). Each step
is a proximal SGD step ``v <- (v' + eta lambda w^t) / (1 + eta lambda)`` with
``v' = v - eta grad F_k(v)``: the paper's step ``v - eta (grad F_k(v) + lambda (v - w^t))`` to
first order in ``eta lambda``, stable for any lambda (lambda -> infinity gives ``v = w^t``;
lambda = 0 local training alone). Exact for plain SGD, the paper's optimizer (see
``DittoLearner`` for momentum and Adam).

The personal models are kept by the server half (``RoundContext.states``) and sent back with
the client's next task; a client's personal model is what it is evaluated with (a client not
yet trained: the global model).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from oiafed.algorithms.fedprox import sent_number
from oiafed.algorithms.personal import (
    PERSONAL,
    PersonalAggregator,
    PersonalLearner,
    load_personal,
    personal_tensors,
)
from oiafed.core.aggregators import extras_problem
from oiafed.core.learner import EPOCHS
from oiafed.core.types import JSON, ClientUpdate, Tensors, Weights
from oiafed.core.weights import load_weights
from oiafed.data.arrays import ArrayDataset
from oiafed.device import CPU
from oiafed.exceptions import ConfigError
from oiafed.registry import register
from oiafed.seeding import PERSONAL as PERSONAL_STREAM
from oiafed.seeding import derive_seed

LAMBDA, PERSONAL_EPOCHS = "lambda", "personal_epochs"


@register("aggregator.ditto")
class Ditto(PersonalAggregator):
    """Ditto's server half: FedAvg of the clients' global-model updates; each client's
    personal model (its update's extras) kept for it.

    Args:
        lam: lambda, the pull of the personal model toward the global one (the paper picks it
            per dataset from {0.01, 0.1, 1, 2}; default 0.1).
        personal_epochs: epochs of the personal model per round (None: the learner's
            ``epochs``).
        weighted, drop_stragglers: as ``fedavg``.

    Raises:
        ConfigError: naming ``aggregator.args.lam`` (negative or not finite) or
            ``aggregator.args.personal_epochs`` (below 1).

    YAML:
        aggregator: {type: ditto, args: {lam: 0.1}}
    """

    client_half: ClassVar[str | None] = "ditto"

    def __init__(self, lam: float = 0.1, personal_epochs: int | None = None,
                 weighted: bool = True, drop_stragglers: bool = False) -> None:
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"must be a finite number >= 0, got {lam}", "aggregator.args.lam")
        if personal_epochs is not None and personal_epochs < 1:
            raise ConfigError(f"must be >= 1, got {personal_epochs}",
                              "aggregator.args.personal_epochs")
        super().__init__(weighted=weighted, drop_stragglers=drop_stragglers)
        self.lam = float(lam)
        self.personal_epochs = personal_epochs

    def check_model(self, model: nn.Module) -> None:
        self.personal_keys = tuple(k for k, t in model.state_dict().items()
                                   if t.is_floating_point())

    def sent_values(self) -> dict[str, JSON]:
        return {LAMBDA: self.lam, PERSONAL_EPOCHS: self.personal_epochs}

    def update_problem(self, update: ClientUpdate, global_weights: Weights) -> str | None:
        return extras_problem(update, {PERSONAL + k: global_weights[k].shape
                                       for k in self.personal_keys})

    def personal_part(self, update: ClientUpdate) -> Tensors:
        return {k: update.extra_tensors[PERSONAL + k].to(CPU, copy=True)
                for k in self.personal_keys}


@register("learner.ditto")
class DittoLearner(PersonalLearner):
    """Ditto's client half: the default learner's training of the global model, then the
    personal model's epochs (sent back as the update's ``personal/`` extras) through the same
    ``train_epoch`` (device, precision, the fit's data already on the device), each optimizer
    step followed by the proximal pull; evaluated with its personal model.

    The pull uses the round's learning rate as ``eta``: exact for plain SGD (no momentum, the
    paper's optimizer); with momentum or Adam ``v'`` is that optimizer's step and the pull
    stays ``eta lambda``. A straggler's reduced epochs bound the personal epochs too."""

    server_half: ClassVar[str | None] = "ditto"
    _data: ArrayDataset | None = None

    async def fit(self, client_id: str, weights: Weights, data: ArrayDataset, *,
                  round_num: int, seed: int, config: dict[str, Any] | None = None,
                  tensors: Tensors | None = None,
                  values: dict[str, JSON] | None = None) -> ClientUpdate:
        self._seed = seed  # the personal model's data order derives from it in end_fit
        return await super().fit(client_id, weights, data, round_num=round_num, seed=seed,
                                 config=config, tensors=tensors, values=values)

    def begin_fit(self) -> None:
        """The global model trains from the global weights alone."""

    def train_epoch(self, data: ArrayDataset, generator: torch.Generator) -> dict[str, float]:
        self._data = data  # the fit's data as trained on (on the device): end_fit's too
        return super().train_epoch(data, generator)

    def end_fit(self, update: ClientUpdate) -> None:
        model, data = self._require_model(), self._data
        assert data is not None, "end_fit follows the fit's epochs"
        load_weights(model, self.global_weights)
        load_personal(model, personal_tensors(self.extra_tensors))
        epochs = int(self.extra_values.get(PERSONAL_EPOCHS) or self.epochs)
        if EPOCHS in self.extra_values:  # a straggler
            epochs = min(epochs, int(sent_number(self, EPOCHS)))
        pull = self.round_lr * sent_number(self, LAMBDA)
        anchors = [(p, self.global_weights[name]) for name, p in model.named_parameters()
                   if p.is_floating_point()]

        def proximal_pull() -> None:
            with torch.no_grad():
                for p, anchor in anchors:
                    p.mul_(1 / (1 + pull)).add_(anchor, alpha=pull / (1 + pull))

        self.optimizer = self.make_optimizer(self.round_lr)
        generator = torch.Generator().manual_seed(derive_seed(self._seed, PERSONAL_STREAM))
        self.post_step = proximal_pull
        try:
            for _ in range(epochs):
                self.train_epoch(data, generator)
        finally:
            self.post_step, self._data = None, None  # the data is not kept past the fit
        update.extra_tensors.update(
            (PERSONAL + k, t.detach().to(CPU, copy=True))
            for k, t in model.state_dict().items() if t.is_floating_point())
