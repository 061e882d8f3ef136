"""Shared body, personal head.

FedPer (Arivazhagan, Aggarwal, Singh and Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019): clients train the whole model; the server averages the base
(body) layers only, and each client keeps its personalization (head) layers.

FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021, Algorithm 1): each client first trains its head
for ``head_epochs`` epochs with the body fixed (lines 6-8; the paper's default 10), then the
body for the learner's ``epochs`` with its head fixed (lines 9-11; default 1); the server
averages the bodies.

The head is the model's submodules named by ``aggregator.args.head`` (default ``head``; the
built-in models have one). Each client's head is kept by the server half and sent with its next
task; the global model's head is FedAvg's average, the start of a client not yet trained.
Personal model: the global body and the client's stored head (the one its last round trained),
evaluated as it is, with no training, as in FedRep's Algorithm 1 and its authors' code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from oiafed.algorithms.fedprox import sent_number
from oiafed.algorithms.personal import (
    HEAD_KEY,
    PersonalAggregator,
    PersonalLearner,
    head_names,
    part_keys,
)
from oiafed.core.types import JSON
from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import ConfigError
from oiafed.registry import register

HEAD_KEYS, HEAD_EPOCHS = "head_keys", "head_epochs"


@register("aggregator.fedper")
class FedPer(PersonalAggregator):
    """FedPer's server half: averages the body, keeps each client's head.

    Args:
        head: the model's submodule(s) that stay personal (``[]``: none, which is FedAvg).
        weighted, drop_stragglers: as ``fedavg``.

    Raises:
        ConfigError: naming ``aggregator.args.head`` for a name the model has no submodule of.

    YAML:
        aggregator: {type: fedper, args: {head: head}}
    """

    client_half: ClassVar[str | None] = "fedper"

    def __init__(self, head: str | list[str] = "head", weighted: bool = True,
                 drop_stragglers: bool = False) -> None:
        super().__init__(weighted=weighted, drop_stragglers=drop_stragglers)
        self.head = head_names(head)

    def check_model(self, model: nn.Module) -> None:
        self.personal_keys = part_keys(model, self.head)


@register("learner.fedper")
class FedPerLearner(PersonalLearner):
    """FedPer's client half: trains the whole model from the global body and its own head."""

    server_half: ClassVar[str | None] = "fedper"


@register("aggregator.fedrep")
class FedRep(FedPer):
    """FedRep's server half: FedPer's, sending the head's keys and ``head_epochs``.

    Args:
        head: as ``fedper``.
        head_epochs: local epochs on the head before the body's (the paper's default 10).
        weighted, drop_stragglers: as ``fedavg``.

    Raises:
        ConfigError: naming ``aggregator.args.head`` (a name the model has no submodule of)
            or ``aggregator.args.head_epochs`` (below 1).

    YAML:
        aggregator: {type: fedrep, args: {head: head, head_epochs: 10}}
        learner: {args: {epochs: 1}}
    """

    client_half: ClassVar[str | None] = "fedrep"

    def __init__(self, head: str | list[str] = "head", head_epochs: int = 10,
                 weighted: bool = True, drop_stragglers: bool = False) -> None:
        if head_epochs < 1:
            raise ConfigError(f"must be >= 1, got {head_epochs}", "aggregator.args.head_epochs")
        super().__init__(head=head, weighted=weighted, drop_stragglers=drop_stragglers)
        self.head_epochs = head_epochs

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        body = [n for n, p in model.named_parameters() if n not in self.personal_keys]
        if not self.personal_keys or not body:
            raise ConfigError("FedRep needs a head and a body that both have parameters; "
                              f"the head {self.head} holds {len(self.personal_keys)} of the "
                              "model's tensors", HEAD_KEY)

    def sent_values(self) -> dict[str, JSON]:
        return {HEAD_KEYS: list(self.personal_keys), HEAD_EPOCHS: self.head_epochs}


@register("learner.fedrep")
class FedRepLearner(PersonalLearner):
    """FedRep's client half: in the first epoch of a round, ``head_epochs`` epochs on the
    head (body fixed) before the body's first epoch; every epoch of the round's ``epochs``
    trains the body (head fixed). Parameters are fixed by leaving them out of the backward
    pass (``requires_grad``), so the optimizer does not move them. Evaluated with its stored
    head on the global body, as it is (``PersonalLearner.personalize``)."""

    server_half: ClassVar[str | None] = "fedrep"

    def begin_fit(self) -> None:
        super().begin_fit()
        self._head_done = False

    def train_epoch(self, data: ArrayDataset, generator: torch.Generator) -> dict[str, float]:
        if not self._head_done:
            with self._training(head=True):
                for _ in range(int(sent_number(self, HEAD_EPOCHS))):
                    super().train_epoch(data, generator)
            self._head_done = True
        with self._training(head=False):
            return super().train_epoch(data, generator)

    @contextmanager
    def _training(self, head: bool) -> Iterator[None]:
        """Within: only the head (True) or only the body (False) trains; after, every
        parameter's ``requires_grad`` is as before."""
        keys = set(self.extra_values.get(HEAD_KEYS) or ())
        params = list(self._require_model().named_parameters())
        before = [p.requires_grad for _, p in params]
        try:
            for (name, p), trainable in zip(params, before, strict=True):
                p.requires_grad_(trainable and (name in keys) == head)
            yield
        finally:
            for (_, p), flag in zip(params, before, strict=True):
                p.requires_grad_(flag)
