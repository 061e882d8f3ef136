"""Central (user-level) differential privacy: DP-FedAvg (McMahan, Ramage, Talwar and Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018), with optional
adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021).

The server is trusted. Each round it clips every client's update ``delta_k = w_k - w`` (all
floating-point tensors of the state dict, buffers included) to L2 norm ``C`` (Algorithm 1,
flat clipping), adds ``N(0, (z C)^2)`` to every coordinate of their sum and
divides by the fixed number of clients sampled per round ``m = qN`` (the fixed-denominator
estimator ``f~_f`` with every weight ``w_k = 1``: each client counts equally). The paper
samples each user independently with probability ``q``; oiafed samples exactly ``m`` clients
without replacement, and accounts for that (``privacy.accounting``).
The result ``w + sum / m`` goes to the aggregator as a single update, so any FedAvg-family
server half (FedAvg, FedProx's, the server optimizers: FedAvgM, FedAdagrad, FedAdam,
FedYogi) takes it as the round's average. Integer buffers keep the global model's values.

With secure aggregation (``runtime.secure_aggregation``) the clients clip their own updates
(weight 1 each) before masking, to just under ``C`` so that fixed-point rounding keeps them
within ``C``; the server gets their float64 sum in one ``SecureSum`` and noises it the same
way (adaptive clipping is refused: it counts unclipped updates the server cannot see).

Randomness: by default (``secure_rng: false``) the noise and the trainer's client sampling
derive from the config's ``seed`` (reproducible: a simulation's default; whoever has the seed
can redraw and remove the noise). With ``secure_rng: true`` both come from the OS CSPRNG
(``secrets``), and runs are not reproducible. ``runtime.mode: grpc`` must choose
(``base.checked_secure_rng``).

Released rounds: the accountant counts every round whose row (metrics of the noised model,
its epsilon) was written, a round redone after a resume included (``count_released``), so a
resumed run reports at least the epsilon of everything it released.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from oiafed.core.averaging import AVERAGING_AGGREGATORS, drops_stragglers
from oiafed.core.types import JSON, ClientUpdate, SecureSum, Weights
from oiafed.exceptions import ConfigError
from oiafed.privacy.accounting import central_epsilon
from oiafed.privacy.base import (
    Privacy,
    checked_number,
    checked_secure_rng,
    require,
    secure_seed,
)
from oiafed.registry import get, register
from oiafed.seeding import PRIVACY, derive_seed

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig

AVERAGE_ID = "dp-average"
"""The client id of the single update the aggregator gets under central DP."""
RELEASED = "dp_rounds_released"
"""The round metric counting the rounds released so far (redone ones included)."""


def update_norm(delta: Weights) -> float:
    """The L2 norm of ``delta`` over its floating-point tensors (summed in float64)."""
    total = sum((t.to(torch.float64).pow(2).sum() for t in delta.values() if t.is_floating_point()),
                torch.zeros((), dtype=torch.float64))
    return float(total.sqrt())


def clip_update(delta: Weights, clip_norm: float) -> tuple[Weights, bool]:
    """``delta`` scaled to L2 norm at most ``clip_norm`` (over its floating-point tensors), and
    whether it had to be: ``delta * min(1, C / ||delta||)`` (DP-FedAvg's flat clipping).

    The input is not modified; non-floating tensors are returned as they are.
    """
    norm = update_norm(delta)
    if norm <= clip_norm:
        return dict(delta), False
    scale = clip_norm / norm
    return {k: t * scale if t.is_floating_point() else t for k, t in delta.items()}, True


def gaussian_noise(like: Weights, std: float, generator: torch.Generator) -> Weights:
    """``N(0, std^2)`` in every coordinate of ``like``'s floating-point tensors (float64, on
    the CPU, drawn in the order of ``like``'s keys from ``generator``)."""
    return {k: torch.normal(0.0, std, size=tuple(t.shape), generator=generator,
                            dtype=torch.float64)
            for k, t in like.items() if t.is_floating_point()}


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """The update's share ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` of the noise when the
    clip count takes noise ``sigma_b`` (Andrew et al. 2021: one round's Gaussian of multiplier
    ``z`` split between the update and the clip count, whose sensitivity is 1/2): the round
    then costs what one Gaussian of multiplier ``z`` does."""
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


@register("privacy.central")
class CentralDP(Privacy):
    """Central (user-level) DP-FedAvg: the server clips each client's update, adds Gaussian
    noise to their sum and reports the ``epsilon`` spent (module docstring).

    Sampling: the accountant assumes the trainer's own sampling, ``clients_per_round`` (or
    ``fraction``) of the federation uniformly without replacement each round (see
    ``privacy.accounting``), so ``client_selection_weights`` are refused, and the update-norm
    filter (``trainer.args.max_update_norm_ratio``, which compares clients) is turned off:
    clipping bounds every update.

    Args:
        noise_multiplier: z, the noise std over the clip norm (0: clipping only, epsilon
            infinite). With adaptive clipping, z is the whole round's (what is accounted);
            the update gets ``z_Delta`` (``update_noise_multiplier``).
        clip_norm: C, the L2 bound of each update (with ``adaptive``: the initial one).
        target_delta: the delta of the ``epsilon`` reported each round.
        adaptive: adapt C toward the ``target_quantile`` of the updates' norms (Andrew et
            al. 2021, Algorithm 1): ``C <- C exp(-clip_lr (b - target_quantile))`` with ``b``
            the noised fraction of unclipped updates.
        target_quantile: gamma.
        clip_lr: eta_C, the geometric step.
        count_noise: sigma_b, the std of the noise on the clip count (default ``m / 20`` for
            ``m`` clients per round, the paper's); it must exceed ``z / 2``.
        secure_rng: draw the noise and the client sampling from the OS CSPRNG, not from the
            seed (module docstring; required under ``runtime.mode: grpc``).

    Raises:
        ConfigError: naming the argument out of range, ``privacy.type`` when
            dp-accounting is not installed (``pip install oiafed[privacy]``), and (at
            config load) ``aggregator.type`` for a server half that cannot be made private.

    YAML:
        privacy:
          type: central
          args: {noise_multiplier: 1.0, clip_norm: 1.0, target_delta: 1.0e-5}
    """

    uniform_sampling = True
    secure_rng: bool

    def __init__(self, noise_multiplier: float = 1.0, clip_norm: float = 1.0,
                 target_delta: float = 1e-5, adaptive: bool = False,
                 target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_noise: float | None = None, secure_rng: bool = False) -> None:
        require("dp_accounting")
        self.noise_multiplier = checked_number(noise_multiplier, "noise_multiplier", zero=True)
        self.initial_clip_norm = checked_number(clip_norm, "clip_norm")
        self.clip_norm = self.initial_clip_norm
        """C of the next round (adapted after each round with ``adaptive``)."""
        if not 0 < target_delta < 1:
            raise ConfigError(f"must be in (0, 1), got {target_delta}", "privacy.args.target_delta")
        if not 0 < target_quantile < 1:
            raise ConfigError(f"must be in (0, 1), got {target_quantile}",
                              "privacy.args.target_quantile")
        self.target_delta = target_delta
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = checked_number(clip_lr, "clip_lr")
        self.count_noise = None if count_noise is None else checked_number(count_noise,
                                                                          "count_noise")
        self.secure_rng = bool(secure_rng)
        self.num_clients = 0
        self.num_sampled = 0
        self.seed = 0
        self.released = 0
        """Rounds whose noised model was released (redone ones counted again)."""
        self._used_clip = self.clip_norm

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Refuse a server half other than the FedAvg family (robust aggregators and
        algorithms whose extras bypass clipping) and FedAvg's ``drop_stragglers``."""
        require("dp_accounting")
        checked_secure_rng(cfg)
        server = get("aggregator", cfg.aggregator.type, path="aggregator.type")
        allowed = [get("aggregator", name) for name in AVERAGING_AGGREGATORS]
        if not (isinstance(server, type) and server in allowed):
            raise ConfigError(
                f"privacy.type central clips and noises the round's average, which aggregator "
                f"{cfg.aggregator.type!r} does not compute (or sends per-client extras that "
                f"clipping would not bound); use one of {', '.join(AVERAGING_AGGREGATORS)}",
                "aggregator.type")
        if drops_stragglers(cfg):
            raise ConfigError("privacy.type central counts every sampled client in the "
                              "fixed denominator; drop_stragglers must be false",
                              "aggregator.args.drop_stragglers")

    def bind(self, num_clients: int, num_sampled: int, seed: int) -> None:
        self.num_clients, self.num_sampled, self.seed = num_clients, num_sampled, seed
        if self.adaptive:
            sigma_b = self.sigma_b
            if self.noise_multiplier > 0 and not 2 * sigma_b > self.noise_multiplier:
                raise ConfigError(
                    f"adaptive clipping needs count_noise > noise_multiplier / 2 "
                    f"({sigma_b} <= {self.noise_multiplier / 2})", "privacy.args.count_noise")

    @property
    def sigma_b(self) -> float:
        """sigma_b: ``count_noise``, or ``m / 20`` (Andrew et al. 2021, Section 4)."""
        return self.count_noise if self.count_noise is not None else self.num_sampled / 20

    @property
    def update_noise(self) -> float:
        """The noise multiplier of the update sum: z, or z_Delta with adaptive clipping."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.sigma_b)

    def prepare(self, round_num: int, updates: list[ClientUpdate],
                global_weights: Weights) -> list[ClientUpdate]:
        """The noised average of the clipped updates, as one update (module docstring).

        A ``SecureSum`` (secure aggregation) holds the float64 sum of updates its members
        clipped themselves (``secagg.updates.clip_target``, before masking): it is added to
        the sum as it is, unclipped again.
        """
        clip = self.clip_norm
        floating = {k: g.to(torch.float64) for k, g in global_weights.items()
                    if g.is_floating_point()}
        total = {k: torch.zeros_like(g) for k, g in floating.items()}
        unclipped = 0
        for update in updates:
            if isinstance(update, SecureSum):
                clipped, count = update.update_sum, 0
            else:
                delta = {k: update.weights[k].to(torch.float64) - g for k, g in floating.items()}
                clipped, was_clipped = clip_update(delta, clip)
                count = int(not was_clipped)
            unclipped += count
            for k, t in clipped.items():
                total[k].add_(t)
        average = self.noised_average(total, global_weights)
        self._used_clip = clip
        if self.adaptive:
            self.adapt_clip(unclipped)
        self.released += 1
        return [ClientUpdate(AVERAGE_ID, 1, {}, average)]

    def _generator(self, *stream: int) -> torch.Generator:
        """The round's noise generator: from the OS CSPRNG with ``secure_rng``, else from
        the seed and the release's index (the round number, until a resume redoes a round
        already released: the redone round then draws fresh noise)."""
        seed = (secure_seed() if self.secure_rng
                else derive_seed(self.seed, PRIVACY, self.released + 1, *stream))
        return torch.Generator().manual_seed(seed)

    def noised_average(self, clipped_sum: Weights, global_weights: Weights) -> Weights:
        """The new weights ``w + (sum + N(0, (z C)^2)) / m`` from ``clipped_sum`` (the sum of
        the round's clipped updates, one float tensor per floating-point key of
        ``global_weights``): the one place where the update noise is drawn (``_generator``).
        Integer tensors keep the global values."""
        generator = self._generator()
        noise = gaussian_noise(clipped_sum, self.update_noise * self.clip_norm, generator)
        average: Weights = {}
        for k, g in global_weights.items():
            if k in clipped_sum:
                mean = (clipped_sum[k].to(torch.float64) + noise[k].to(g.device)) / self.num_sampled
                average[k] = (g.to(torch.float64) + mean).to(g.dtype)
            else:
                average[k] = g.clone()
        return average

    def adapt_clip(self, unclipped: int) -> None:
        """Andrew et al. 2021, Algorithm 1: ``b = (unclipped + N(0, sigma_b^2)) / m``, then
        ``C <- C exp(-clip_lr (b - target_quantile))`` (noise from ``_generator``)."""
        generator = self._generator(1)
        noised = unclipped + float(torch.normal(0.0, self.sigma_b, size=(1,),
                                                generator=generator, dtype=torch.float64))
        fraction = noised / self.num_sampled
        self.clip_norm *= math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds (``privacy.accounting.central_epsilon``)."""
        return central_epsilon(num_clients=self.num_clients, num_sampled=self.num_sampled,
                               noise_multiplier=self.noise_multiplier, rounds=rounds,
                               target_delta=self.target_delta)

    def epsilon_spent(self) -> float:
        """Epsilon of the rounds released so far, redone ones included."""
        return self.epsilon_after(self.released)

    def epsilon_next(self) -> float:
        """Epsilon once the next round is released."""
        return self.epsilon_after(self.released + 1)

    def round_metrics(self, round_num: int) -> dict[str, float]:
        """``epsilon`` spent so far, the rounds it counts and the ``clip_norm`` the round
        used."""
        return {"epsilon": self.epsilon_spent(), RELEASED: self.released,
                "clip_norm": self._used_clip}

    def count_released(self, rows: Sequence[dict[str, JSON]],
                       client_rows: Iterable[dict[str, JSON]]) -> None:
        """Count the rounds released before the resume: the most any row says were, or its
        round number (a row of a version that did not count)."""
        for row in rows:
            count = row.get(RELEASED, row.get("round"))
            if isinstance(count, int | float) and math.isfinite(count):
                self.released = max(self.released, int(count))

    def state_dict(self) -> dict[str, JSON]:
        return {"clip_norm": self.clip_norm, "released": self.released}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        clip, released = state.get("clip_norm"), state.get("released")
        self.clip_norm = float(clip) if isinstance(clip, int | float) else self.initial_clip_norm
        self.released = int(released) if isinstance(released, int) else 0

