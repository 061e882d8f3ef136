"""Aggregators: combine client updates into new global weights.

The maths lives in pure functions (``weighted_average``); ``Aggregator`` objects choose the
weights and hold any state an algorithm needs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from oiafed.core.types import ClientUpdate, Weights
from oiafed.exceptions import OiafedError
from oiafed.registry import register


def weighted_average(weights_list: Sequence[Weights], coefficients: Sequence[float]) -> Weights:
    """Average state dicts with the given non-negative coefficients (normalised to sum 1).

    Floating-point tensors are averaged (in float64, cast back); other tensors (integer
    buffers such as step counters) are taken from the update with the largest coefficient.
    The inputs are not modified.

    Raises:
        OiafedError: on an empty list, a negative, non-finite or all-zero coefficient, or
            mismatched keys or shapes.
    """
    if not weights_list:
        raise OiafedError("cannot aggregate zero updates")
    coeffs = [float(c) for c in coefficients]
    if len(coeffs) != len(weights_list):
        raise OiafedError(f"{len(weights_list)} updates but {len(coeffs)} coefficients")
    if any(not math.isfinite(c) or c < 0 for c in coeffs):
        raise OiafedError(f"aggregation coefficients must be finite and non-negative: {coeffs}")
    total = sum(coeffs)
    if total <= 0:
        raise OiafedError("aggregation coefficients sum to zero (every update has weight 0)")
    keys = weights_list[0].keys()
    for i, weights in enumerate(weights_list[1:], start=1):
        if weights.keys() != keys:
            raise OiafedError(f"update {i} has keys {sorted(weights)} instead of {sorted(keys)}")
        for key in keys:
            if weights[key].shape != weights_list[0][key].shape:
                raise OiafedError(f"update {i} has {key!r} of shape {tuple(weights[key].shape)} "
                                  f"instead of {tuple(weights_list[0][key].shape)}")
    scale = [c / total for c in coeffs]
    leader = max(range(len(coeffs)), key=coeffs.__getitem__)
    averaged: Weights = {}
    for key in keys:
        first = weights_list[0][key]
        if first.is_floating_point():  # one float64 accumulator: no stacked copy of them all
            mixed = first.to(torch.float64) * scale[0]
            for weights, coefficient in zip(weights_list[1:], scale[1:], strict=True):
                mixed.add_(weights[key], alpha=coefficient)
            averaged[key] = mixed.to(first.dtype)
        else:
            averaged[key] = weights_list[leader][key].clone()
    return averaged


class Aggregator(ABC):
    """Turns the round's client updates into the next global weights."""

    @abstractmethod
    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        """New global weights from ``updates`` (``global_weights``: this round's start)."""

    def state_dict(self) -> dict[str, Any]:
        """State to save with the run (stateless aggregators return ``{}``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


@register("aggregator.fedavg")
class FedAvg(Aggregator):
    """Federated averaging (McMahan et al., 2017).

    Args:
        weighted: weight each update by its ``num_samples`` (default); ``False`` takes the
            plain mean.

    YAML:
        aggregator:
          type: fedavg
          args: {weighted: true}
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        coefficients = [u.num_samples if self.weighted else 1.0 for u in updates]
        return weighted_average([u.weights for u in updates], coefficients)
