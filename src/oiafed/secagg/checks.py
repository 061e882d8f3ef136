"""Which configs secure aggregation can serve (``runtime.secure_aggregation``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oiafed import registry
from oiafed.core.averaging import AVERAGING_AGGREGATORS, drops_stragglers
from oiafed.exceptions import ConfigError
from oiafed.secagg import quantize

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig

SECURE_AGGREGATORS = (*AVERAGING_AGGREGATORS, "finetune")
"""Server halves that need only the round's (sample-weighted) mean of the clients' weights."""
PATH = "runtime.secure_aggregation"


def check_config(cfg: ExperimentConfig) -> None:
    """Refuse what secure aggregation cannot serve: another runtime than gRPC, a server half
    that needs each client's update (robust aggregators, algorithms with extras or per-client
    state), FedAvg's ``drop_stragglers``, a simulated attack, local DP (its accountant reads
    each client's steps), adaptive central-DP clipping, personal evaluation (each client's
    metrics would reach the server in clear), and settings no round can meet: a threshold
    above the clients sampled per round, or a ``bound`` and ``precision_bits`` whose sum
    over those clients could wrap around Z_{2**64}.

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
    if drops_stragglers(cfg):
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
    if cfg.data.local_test_fraction > 0:
        raise ConfigError("personal evaluation sends each client's accuracy, loss and test size "
                          "to the server in clear: data.local_test_fraction must be 0 with "
                          "runtime.secure_aggregation", "data.local_test_fraction")
    check_round_settings(cfg)


def check_round_settings(cfg: ExperimentConfig) -> None:
    """Refuse a ``threshold`` above the clients sampled per round (or a round of one client),
    and a ``bound`` and ``precision_bits`` that could wrap around even at one unit of weight
    per sampled client (``quantize.fits``).

    Raises:
        ConfigError: naming the key of ``runtime.secure_aggregation`` at fault.
    """
    section = cfg.runtime.secure_aggregation
    if section is None:
        return
    sampled = sampled_per_round(cfg)
    threshold = section.threshold if section.threshold is not None else 2
    if threshold > sampled:
        raise ConfigError(f"{threshold} is more than the {sampled} clients sampled per round "
                          "(trainer.args.clients_per_round or fraction, data.num_clients): "
                          "every round would fail", f"{PATH}.threshold")
    if not quantize.fits(sampled, section.bound, section.precision_bits):
        raise ConfigError(f"{sampled} clients * bound {section.bound:g} * "
                          f"2**{section.precision_bits} reaches 2**63: the sum could wrap around "
                          "Z_2^64; lower bound or precision_bits", f"{PATH}.precision_bits")


def sampled_per_round(cfg: ExperimentConfig) -> int:
    """The clients each round samples, as the trainer counts them (``Trainer.num_sampled``)."""
    total = cfg.data.num_clients
    args = cfg.trainer.args
    if args.get("clients_per_round") is not None:
        return min(int(args["clients_per_round"]), total)
    if args.get("fraction") is not None:
        return max(1, round(float(args["fraction"]) * total))
    return total
