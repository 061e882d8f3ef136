"""Which configs secure aggregation can serve (``runtime.secure_aggregation``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oiafed import registry
from oiafed.exceptions import ConfigError

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig

SECURE_AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi",
                      "finetune")
"""Server halves that need only the round's (sample-weighted) mean of the clients' weights."""
PATH = "runtime.secure_aggregation"


def check_config(cfg: ExperimentConfig) -> None:
    """Refuse what secure aggregation cannot serve: another runtime than gRPC, a server half
    that needs each client's update (robust aggregators, algorithms with extras or per-client
    state), FedAvg's ``drop_stragglers``, a simulated attack, local DP (its accountant reads
    each client's steps) and adaptive central-DP clipping.

    Raises:
        ConfigError: naming ``runtime.secure_aggregation`` and the key at fault.
    """
    if cfg.runtime.mode != "grpc":
        raise ConfigError(f"secure aggregation runs on runtime.mode grpc only, not "
                          f"{cfg.runtime.mode!r}", PATH)
    server = registry.get("aggregator", cfg.aggregator.type, path="aggregator.type")
    if server not in [registry.get("aggregator", name) for name in SECURE_AGGREGATORS]:
        raise ConfigError(f"the server learns only the round's sum, which aggregator "
                          f"{cfg.aggregator.type!r} cannot use (it needs each client's update or "
                          f"extras); use one of {', '.join(SECURE_AGGREGATORS)} (aggregator.type)",
                          PATH)
    if cfg.aggregator.args.get("drop_stragglers"):
        raise ConfigError("the server cannot leave out stragglers it cannot see: "
                          "aggregator.args.drop_stragglers must be false", PATH)
    if cfg.attack is not None:
        raise ConfigError("a simulated attack rewrites clients' updates on the server, which "
                          "never sees them: remove the attack section", PATH)
    if cfg.privacy is not None and cfg.privacy.type == "local":
        raise ConfigError("local DP's accountant reads each client's steps from its update, "
                          "which the server never sees: use privacy.type central", PATH)
    if cfg.privacy is not None and cfg.privacy.type == "central" and cfg.privacy.args.get(
            "adaptive"):
        raise ConfigError("adaptive clipping counts unclipped updates the server cannot see: "
                          "privacy.args.adaptive must be false", PATH)
