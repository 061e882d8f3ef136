"""Federated algorithms beyond FedAvg: one module each, its server half (an ``Aggregator``)
and, where it needs one, its client half (a ``Learner``), paired by ``client_half``."""
from oiafed.algorithms import (  # noqa: F401
    ditto,
    fedbn,
    feddyn,
    fednova,
    fedper,
    fedprox,
    finetune,
    moon,
    robust,
    scaffold,
    server_optimizers,
)
