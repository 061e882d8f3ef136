"""Byzantine-robust aggregation: coordinate-wise median and trimmed mean (Yin et al., ICML 2018),
Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

Every rule is unweighted (a client's claimed ``num_samples`` would let an attacker weigh
more) and works on the round's updates, floating-point tensors in float64, cast back. Other
tensors (integer step counters) are taken as ``weighted_average`` takes them: from the first
update (all weigh the same), or from the updates Krum selects.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from oiafed.core.aggregators import Aggregator, weighted_average
from oiafed.core.types import ClientUpdate, Weights
from oiafed.exceptions import ConfigError, OiafedError, RoundFailed
from oiafed.registry import register

logger = logging.getLogger(__name__)


def check_alike(weights_list: Sequence[Weights]) -> None:
    """Raise ``OiafedError`` for zero state dicts or ones of other keys or shapes."""
    if not weights_list:
        raise OiafedError("cannot aggregate zero updates")
    first = weights_list[0]
    for i, weights in enumerate(weights_list[1:], start=1):
        if weights.keys() != first.keys():
            raise OiafedError(f"update {i} has keys {sorted(weights)} instead of {sorted(first)}")
        for key, tensor in first.items():
            if weights[key].shape != tensor.shape:
                raise OiafedError(f"update {i} has {key!r} of shape {tuple(weights[key].shape)} "
                                  f"instead of {tuple(tensor.shape)}")


def stacked(weights_list: Sequence[Weights], key: str) -> torch.Tensor:
    """The ``key`` tensors of all state dicts, stacked on a new first dimension, in float64."""
    return torch.stack([weights[key].to(torch.float64) for weights in weights_list])


def _coordinatewise(weights_list: Sequence[Weights], rule: str, trim: int = 0) -> Weights:
    check_alike(weights_list)
    n = len(weights_list)
    result: Weights = {}
    for key, first in weights_list[0].items():
        if not first.is_floating_point():
            result[key] = first.clone()
            continue
        values = stacked(weights_list, key)
        if rule == "mean" and trim == 0:
            combined = values.mean(dim=0)
        else:
            ordered = values.sort(dim=0).values
            if rule == "mean":
                combined = ordered[trim:n - trim].mean(dim=0)
            elif n % 2:
                combined = ordered[n // 2]
            else:
                combined = (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        result[key] = combined.to(first.dtype)
    return result


def coordinate_median(weights_list: Sequence[Weights]) -> Weights:
    """The coordinate-wise median (Yin et al., ICML 2018, Definition 1); for an even count,
    the mean of the two middle values."""
    return _coordinatewise(weights_list, "median")


def trim_count(beta: float, n: int) -> int:
    """``floor(beta * n)``, with ``beta`` read as the decimal it was written as (so 0.29 of
    100 trims 29, where the float product 28.999... would trim 28)."""
    return math.floor(Fraction(repr(float(beta))) * n)


def trimmed_mean(weights_list: Sequence[Weights], beta: float) -> Weights:
    """The coordinate-wise ``beta``-trimmed mean (Yin et al., ICML 2018, Definition 2): per
    coordinate, drop the ``floor(beta * n)`` largest and smallest values, average the rest."""
    if not 0 <= beta < 0.5:
        raise OiafedError(f"the trimmed mean needs beta in [0, 0.5), got {beta}")
    return _coordinatewise(weights_list, "mean", trim_count(beta, len(weights_list)))


def squared_distances(weights_list: Sequence[Weights]) -> torch.Tensor:
    """The n x n squared Euclidean distances between the state dicts, over all their
    floating-point tensors flattened together (float64)."""
    check_alike(weights_list)
    n = len(weights_list)
    first = weights_list[0]
    device = next(iter(first.values())).device if first else torch.device("cpu")
    distances = torch.zeros(n, n, dtype=torch.float64, device=device)
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            continue
        flat = stacked(weights_list, key).reshape(n, -1)
        for i in range(n):
            distances[i] += (flat - flat[i]).square().sum(dim=1)
    return distances


def krum_scores(weights_list: Sequence[Weights], f: int) -> torch.Tensor:
    """Krum's scores (Blanchard et al., NeurIPS 2017, Section 4): for each update, the sum of
    its squared distances to its ``n - f - 2`` nearest other updates.

    Raises:
        OiafedError: unless ``n > 2 f + 2``.
    """
    n = len(weights_list)
    if n <= 2 * f + 2:
        raise OiafedError(f"Krum with f={f} needs more than 2f+2 = {2 * f + 2} updates, got {n}")
    distances = squared_distances(weights_list)
    others = distances.masked_fill(torch.eye(n, dtype=torch.bool, device=distances.device),
                                   math.inf)
    return others.sort(dim=1).values[:, :n - f - 2].sum(dim=1)


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"must be an integer >= {low}, got {value!r}", f"aggregator.args.{name}")


@register("aggregator.median")
class Median(Aggregator):
    """Coordinate-wise median of the round's updates (Yin et al., ICML 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", Definition 1); for an even
    number of updates, the mean of the two middle values.

    YAML:
        aggregator:
          type: median
    """

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        return coordinate_median([u.weights for u in updates])


@register("aggregator.trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, Definition 2): per coordinate,
    the largest and smallest ``floor(beta * n)`` of the round's ``n`` values are dropped and
    the rest averaged (beta 0: the plain mean).

    Args:
        beta: the share trimmed at each end, in [0, 0.5).

    YAML:
        aggregator:
          type: trimmed_mean
          args: {beta: 0.1}
    """

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:  # False for NaN too
            raise ConfigError(f"must be in [0, 0.5), got {beta}", "aggregator.args.beta")
        self.beta = beta

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        return trimmed_mean([u.weights for u in updates], self.beta)


@register("aggregator.krum")
class Krum(Aggregator):
    """Krum (Blanchard et al., NeurIPS 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", Section 4): the update with the lowest score, the sum of
    squared distances to its ``n - f - 2`` nearest others (all floating-point tensors
    flattened together). Needs ``n > 2f + 2`` updates.

    The clients chosen in the last round are in ``last_selected`` (and logged at debug level).

    Args:
        f: the number of Byzantine clients tolerated.

    YAML:
        aggregator:
          type: krum
          args: {f: 1}
    """

    def __init__(self, f: int = 1) -> None:
        _check_int("f", f, 0)
        self.f = f
        self.last_selected: list[str] = []

    def check_federation(self, num_clients: int, num_sampled: int) -> None:
        if num_sampled <= 2 * self.f + 2:
            raise ConfigError(
                f"{type(self).__name__} with f={self.f} needs more than 2f+2 = "
                f"{2 * self.f + 2} clients per round; the federation samples {num_sampled}",
                "aggregator.args.f")

    def count(self, n: int) -> int:
        """How many of ``n`` updates to average (Krum: 1)."""
        return 1

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        n = len(updates)
        round_num = self.context.round_num if self.context is not None else 0
        if n <= 2 * self.f + 2:
            raise RoundFailed(
                f"round {round_num}: {type(self).__name__} with f={self.f} needs more than "
                f"2f+2 = {2 * self.f + 2} updates, {n} arrived (the others failed)")
        scores = krum_scores([u.weights for u in updates], self.f)
        order = torch.argsort(scores, stable=True).tolist()
        chosen = [updates[i] for i in order[:self.count(n)]]
        self.last_selected = [u.client_id for u in chosen]
        logger.debug("round %d: %s selected %s", round_num, type(self).__name__,
                     ", ".join(self.last_selected))
        return weighted_average([u.weights for u in chosen], [1.0] * len(chosen))


@register("aggregator.multi_krum")
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., NeurIPS 2017, Section 5): the plain mean of the ``m``
    updates with the lowest Krum scores (``m = 1`` is Krum; ``m = n`` the mean).

    Args:
        f: the number of Byzantine clients tolerated.
        m: how many updates to average (None: ``n - f`` of the round's ``n``); a round with
            fewer than ``m`` updates averages all of them.

    YAML:
        aggregator:
          type: multi_krum
          args: {f: 1, m: 3}
    """

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f)
        if m is not None:
            _check_int("m", m, 1)
        self.m = m

    def check_federation(self, num_clients: int, num_sampled: int) -> None:
        super().check_federation(num_clients, num_sampled)
        if self.m is not None and self.m > num_sampled:
            raise ConfigError(f"cannot average {self.m} updates of the {num_sampled} clients "
                              "sampled per round", "aggregator.args.m")

    def count(self, n: int) -> int:
        return n - self.f if self.m is None else min(self.m, n)
