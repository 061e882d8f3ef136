"""FedBN (Li, Jiang, Zhang, Kamp and Dou, "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021, Algorithm 1): clients share every layer but their
batch-normalization layers, whose weights, biases and running statistics stay local.

Each client's batch-norm tensors are kept by the server half (``RoundContext.states``) and sent
back with its next training or evaluation task: a client trains and is evaluated with its own.
The global model's batch-norm tensors are FedAvg's average, the start of a client not yet
trained. On a model without batch normalization FedBN is FedAvg.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from oiafed.algorithms.personal import PersonalAggregator, PersonalLearner, norm_keys
from oiafed.registry import register


@register("aggregator.fedbn")
class FedBN(PersonalAggregator):
    """FedBN's server half: averages all but each client's batch-norm layers (kept per client).

    Args:
        weighted, drop_stragglers: as ``fedavg``.

    YAML:
        aggregator: {type: fedbn}
    """

    client_half: ClassVar[str | None] = "fedbn"

    def check_model(self, model: nn.Module) -> None:
        self.personal_keys = norm_keys(model)


@register("learner.fedbn")
class FedBNLearner(PersonalLearner):
    """FedBN's client half: trains and evaluates with its own batch-norm tensors."""

    server_half: ClassVar[str | None] = "fedbn"
