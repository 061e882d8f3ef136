"""Simulated Byzantine clients: which clients an attack controls and what they send.

An attack is set in the config's top-level ``attack:`` section. The attacked set is fixed for
the whole run: ``fraction`` of the federation drawn from the seed, or the ids in ``clients``.
Attacks on what clients train (``label_flip``) reach the client as a value of its task; attacks
on what clients send are applied by the server to the attacked clients' updates after they
arrive, before the aggregator sees them (an omniscient attacker that may read the round's
honest updates, as ALIE and IPM assume). Attacked updates are marked (``ClientUpdate.attacked``)
so callbacks can see them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from oiafed.core.learner import LABEL_FLIP
from oiafed.core.types import JSON, ClientUpdate, Weights
from oiafed.data.federated import id_set
from oiafed.exceptions import ConfigError
from oiafed.registry import register
from oiafed.seeding import ATTACK, rng


class Attack(ABC):
    """Which clients are attacked and what their updates become.

    Args:
        fraction: the share of the federation attacked (drawn once from the seed), or
        clients: the attacked client ids.

    Raises:
        ConfigError: for both or neither of ``fraction`` and ``clients``, a fraction outside
            [0, 1], or (from ``choose``) a client id the federation does not have.
    """

    def __init__(self, fraction: float | None = None, clients: list[str] | None = None) -> None:
        if (fraction is None) == (clients is None):
            raise ConfigError("set fraction or clients (not both)", "attack.args")
        if fraction is not None and not 0 <= fraction <= 1:
            raise ConfigError(f"must be in [0, 1], got {fraction}", "attack.args.fraction")
        self.fraction = fraction
        self.clients = clients

    def choose(self, client_ids: Sequence[str], seed: int) -> frozenset[str]:
        """The attacked clients of this federation (the same in every run of the seed).

        Memory: with ``clients``, O(named clients); with ``fraction``, O(attacked clients), and
        for a moment O(all clients) when more than 1 in 50 are drawn (NumPy's draw without
        replacement then shuffles every index).
        """
        if self.clients is not None:
            known = id_set(client_ids)
            unknown = [cid for cid in self.clients if cid not in known]
            if unknown:
                raise ConfigError(f"names clients the federation does not have: "
                                  f"{', '.join(map(repr, unknown[:5]))}", "attack.args.clients")
            return frozenset(self.clients)
        assert self.fraction is not None
        count = round(self.fraction * len(client_ids))
        picked = rng(seed, ATTACK).choice(len(client_ids), size=count, replace=False)
        return frozenset(client_ids[int(i)] for i in picked)

    def client_values(self) -> dict[str, JSON]:
        """Values every attacked client's task carries (default: none)."""
        return {}

    @abstractmethod
    def apply(self, attacked: list[ClientUpdate], honest: list[ClientUpdate],
              global_weights: Weights, generator: torch.Generator) -> None:
        """Change the ``attacked`` updates' weights in place (``honest``: the round's other
        updates; ``generator``: this round's random stream)."""


def deltas(updates: Sequence[ClientUpdate], global_weights: Weights, key: str) -> torch.Tensor:
    """The updates' ``key`` minus the global one, stacked (float64, where the global one is:
    the server's device, while updates arrive on the CPU)."""
    base = global_weights[key].double()
    return torch.stack([u.weights[key].to(base.device, torch.float64) - base for u in updates])


def set_delta(update: ClientUpdate, global_weights: Weights, key: str, delta: torch.Tensor) -> None:
    """Make ``update``'s ``key`` the global one plus ``delta`` (in its own dtype and on its
    own device)."""
    base = global_weights[key]
    value = base.double() + delta.to(base.device)
    update.weights[key] = value.to(device=update.weights[key].device, dtype=base.dtype)


def floating_keys(global_weights: Weights) -> list[str]:
    """The keys an attack changes: floating-point tensors (not counters)."""
    return [k for k, v in global_weights.items() if v.is_floating_point()]


@register("attack.label_flip")
class LabelFlip(Attack):
    """Attacked clients train on flipped labels ``C - 1 - y`` (a data-poisoning baseline;
    e.g. Fang et al., USENIX Security 2020); they send what they trained honestly."""

    def client_values(self) -> dict[str, JSON]:
        return {LABEL_FLIP: True}

    def apply(self, attacked: list[ClientUpdate], honest: list[ClientUpdate],
              global_weights: Weights, generator: torch.Generator) -> None:
        """Nothing to change: the harm was done in training."""


@register("attack.sign_flip")
class SignFlip(Attack):
    """Attacked clients send their update reversed and scaled: ``w_g - scale (w_k - w_g)``
    (the sign-flipping attack of e.g. Li et al., AAAI 2019, RSA).

    Args:
        scale: how far the reversed update goes (default 1: the same length).
    """

    def __init__(self, fraction: float | None = None, clients: list[str] | None = None,
                 scale: float = 1.0) -> None:
        super().__init__(fraction, clients)
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"must be a finite number > 0, got {scale}", "attack.args.scale")
        self.scale = scale

    def apply(self, attacked: list[ClientUpdate], honest: list[ClientUpdate],
              global_weights: Weights, generator: torch.Generator) -> None:
        if not attacked:  # every attacked client of the round failed
            return
        for key in floating_keys(global_weights):
            for update, delta in zip(attacked, deltas(attacked, global_weights, key), strict=True):
                set_delta(update, global_weights, key, -self.scale * delta)


@register("attack.gaussian")
class Gaussian(Attack):
    """Attacked clients send Gaussian noise as their update: ``w_g + N(0, std^2)`` per
    coordinate (the Gaussian attack of Blanchard et al., NeurIPS 2017).

    Args:
        std: the noise's standard deviation.
    """

    def __init__(self, fraction: float | None = None, clients: list[str] | None = None,
                 std: float = 1.0) -> None:
        super().__init__(fraction, clients)
        if not math.isfinite(std) or std <= 0:
            raise ConfigError(f"must be a finite number > 0, got {std}", "attack.args.std")
        self.std = std

    def apply(self, attacked: list[ClientUpdate], honest: list[ClientUpdate],
              global_weights: Weights, generator: torch.Generator) -> None:
        for update in attacked:
            for key in floating_keys(global_weights):
                shape = global_weights[key].shape
                noise = torch.randn(shape, generator=generator, dtype=torch.float64) * self.std
                set_delta(update, global_weights, key, noise)


@register("attack.alie")
class ALittleIsEnough(Attack):
    """"A Little Is Enough" (Baruch et al., NeurIPS 2019, Algorithm 3): every attacked client
    sends ``mean - z_max * std`` of the round's updates per coordinate, with ``z_max`` from
    the paper's Eq. (3) for ``n`` clients of which ``m`` are attacked:
    ``s = floor(n/2 + 1) - m`` and ``z_max = Phi^-1((n - s) / n)``.

    Mean and standard deviation are those of the honest updates of the round (the paper's
    attacker estimates them from the corrupted workers' own data; an omniscient one, as here,
    is the stronger and usual simulation). ``z`` overrides ``z_max``.

    Args:
        z: the number of standard deviations (None: the paper's ``z_max``).
    """

    def __init__(self, fraction: float | None = None, clients: list[str] | None = None,
                 z: float | None = None) -> None:
        super().__init__(fraction, clients)
        if z is not None and not math.isfinite(z):
            raise ConfigError(f"must be a finite number, got {z}", "attack.args.z")
        self.z = z

    @staticmethod
    def z_max(n: int, m: int) -> float:
        """Eq. (3) of the paper: the largest z that stays within the majority's spread."""
        s = math.floor(n / 2 + 1) - m
        share = (n - s) / n
        share = min(max(share, 1e-12), 1 - 1e-12)
        return float(torch.special.ndtri(torch.tensor(share, dtype=torch.float64)))

    def apply(self, attacked: list[ClientUpdate], honest: list[ClientUpdate],
              global_weights: Weights, generator: torch.Generator) -> None:
        if not attacked or not honest:
            return
        z = self.z if self.z is not None else self.z_max(len(attacked) + len(honest), len(attacked))
        for key in floating_keys(global_weights):
            stacked = deltas(honest, global_weights, key)
            std = stacked.std(dim=0, unbiased=False) if len(honest) > 1 else torch.zeros_like(stacked[0])
            target = stacked.mean(dim=0) - z * std
            for update in attacked:
                set_delta(update, global_weights, key, target)


@register("attack.ipm")
class InnerProductManipulation(Attack):
    """Inner product manipulation (Xie et al., UAI 2019, "Fall of Empires"): every attacked
    client sends ``-epsilon`` times the mean of the round's honest updates, so the aggregate's
    inner product with the true direction turns negative.

    Args:
        epsilon: the scale (the paper uses 0.1 against Krum-like rules and larger values,
            up to ~10, against median-like ones).
    """

    def __init__(self, fraction: float | None = None, clients: list[str] | None = None,
                 epsilon: float = 0.1) -> None:
        super().__init__(fraction, clients)
        if not math.isfinite(epsilon) or epsilon <= 0:
            raise ConfigError(f"must be a finite number > 0, got {epsilon}", "attack.args.epsilon")
        self.epsilon = epsilon

    def apply(self, attacked: list[ClientUpdate], honest: list[ClientUpdate],
              global_weights: Weights, generator: torch.Generator) -> None:
        if not attacked or not honest:
            return
        for key in floating_keys(global_weights):
            target = -self.epsilon * deltas(honest, global_weights, key).mean(dim=0)
            for update in attacked:
                set_delta(update, global_weights, key, target)
