"""The server halves whose round result is the clients' (weighted) average and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig

AVERAGING_AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
"""FedAvg and the server halves that take the round's average as FedAvg's (FedProx's, the
server optimizers): what central DP can noise and secure aggregation can sum."""


def drops_stragglers(cfg: ExperimentConfig) -> bool:
    """Whether the server half leaves out the round's stragglers (FedAvg's
    ``drop_stragglers``): the average then holds a number of clients known only then."""
    return bool(cfg.aggregator.args.get("drop_stragglers"))
