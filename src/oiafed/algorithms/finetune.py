"""Local fine-tuning, the usual personalization baseline (Wang et al., "Federated Evaluation
of On-device Personalization", arXiv:1910.10252, 2019): FedAvg trains the global model; each
client's personal model is the global model fine-tuned on its own training data for ``epochs``
local epochs (the learner's batch size and learning rate) just before it is evaluated."""

from __future__ import annotations

from typing import ClassVar

import torch

from oiafed.algorithms.fedprox import sent_number
from oiafed.core.aggregators import FedAvg
from oiafed.core.learner import Learner
from oiafed.core.types import RoundPlan, Weights
from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import ConfigError
from oiafed.registry import register

EPOCHS = "finetune_epochs"
"""The value an evaluation sends: the fine-tuning epochs."""


@register("aggregator.finetune")
class FineTune(FedAvg):
    """FedAvg, whose personal evaluation fine-tunes the global model on each client first.

    Args:
        epochs: local fine-tuning epochs before evaluation (default 1).
        weighted, drop_stragglers: as ``fedavg``.

    Raises:
        ConfigError: naming ``aggregator.args.epochs`` when it is below 0.

    YAML:
        aggregator: {type: finetune, args: {epochs: 1}}
    """

    client_half: ClassVar[str | None] = "finetune"

    def __init__(self, epochs: int = 1, weighted: bool = True,
                 drop_stragglers: bool = False) -> None:
        if epochs < 0:
            raise ConfigError(f"must be >= 0, got {epochs}", "aggregator.args.epochs")
        super().__init__(weighted=weighted, drop_stragglers=drop_stragglers)
        self.epochs = epochs

    def evaluation_plan(self, global_weights: Weights) -> RoundPlan:
        return RoundPlan(values={EPOCHS: self.epochs})


@register("learner.finetune")
class FineTuneLearner(Learner):
    """Trains as the default learner; before a personal evaluation, ``finetune_epochs``
    epochs on the client's training data."""

    server_half: ClassVar[str | None] = "finetune"

    def personalize(self, data: ArrayDataset, generator: torch.Generator) -> None:
        for _ in range(int(sent_number(self, EPOCHS))):
            self.train_epoch(data, generator)
