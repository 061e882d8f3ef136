"""Aggregators: combine client updates into new global weights.

The maths lives in pure functions (``weighted_average``); ``Aggregator`` objects choose the
weights and hold any state an algorithm needs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from oiafed.core.types import ClientUpdate, RoundContext, RoundPlan, Weights
from oiafed.exceptions import OiafedError
from oiafed.registry import register


def buffers(updates: Sequence[ClientUpdate], parameter_names: Collection[str]) -> list[Weights]:
    """Each update's weights less ``parameter_names``: what an algorithm with its own formula
    for the parameters still averages (BatchNorm statistics, ...)."""
    skip = frozenset(parameter_names)
    return [{k: v for k, v in u.weights.items() if k not in skip} for u in updates]


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
    """The server half of a federated algorithm: what each round's clients are sent beside
    the global weights, and how their updates become the next global weights.

    The trainer sets ``context`` (a ``RoundContext``: the round, its clients, the per-client
    ``states``) before ``configure_round`` and leaves it for ``aggregate``. An algorithm with
    a client half names its learner in ``client_half`` (a ``learner.*`` registry name): a
    config that names no learner gets it, one that names another is refused.
    """

    client_half: ClassVar[str | None] = None
    """The registry name of the learner this algorithm needs (None: any learner)."""

    context: RoundContext | None = None

    def check_federation(self, num_clients: int, num_sampled: int) -> None:
        """Refuse arguments this federation cannot honour (``ConfigError`` naming the key);
        called once, before the first round."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse arguments this model cannot honour (a head it has no submodule of:
        ``ConfigError`` naming the key) and note what the algorithm needs of it; called once,
        before the first round."""

    def configure_round(self, global_weights: Weights) -> RoundPlan:
        """The extras this round's clients get (default: none)."""
        return RoundPlan()

    def evaluation_plan(self, global_weights: Weights) -> RoundPlan:
        """What the clients of a personal evaluation (``context.sampled``) get beside the
        global weights to build their personal models (default: none: the global model)."""
        return RoundPlan()

    def update_problem(self, update: ClientUpdate, global_weights: Weights) -> str | None:
        """Why ``update``'s extras do not fit this algorithm (None: they do); the update is
        then left out as a bad update. Default: none expected, any accepted."""
        return None

    @abstractmethod
    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        """New global weights from ``updates`` (``global_weights``: this round's start)."""

    def state_dict(self) -> dict[str, Any]:
        """State to save with the run (tensors and JSON values; stateless: ``{}``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def round_context(self) -> RoundContext:
        """``context``, which the trainer sets before each round."""
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__} is used outside a round (no context)")
        return self.context


def extras_problem(update: ClientUpdate, expected: dict[str, torch.Size],
                   values: tuple[str, ...] = ()) -> str | None:
    """Why ``update``'s extra tensors are not exactly ``expected`` (names and shapes, finite
    floating point) or it lacks a number in one of ``values`` (None: they fit)."""
    tensors = update.extra_tensors
    if tensors.keys() != expected.keys():
        unknown, missing = tensors.keys() - expected.keys(), expected.keys() - tensors.keys()
        return (f"extras: unknown {sorted(unknown)[:5]}, missing {sorted(missing)[:5]}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != shape:
            return f"extra {name!r} is not a tensor of shape {tuple(shape)}"
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            return f"extra {name!r} is not finite floating point"
    for name in values:
        value = update.extra_values.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return f"extra value {name!r} must be a finite number, got {value!r:.40}"
    return None


def without_stragglers(aggregator: Aggregator, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """``updates`` less those of the round's stragglers (as FedAvg in the FedProx paper)."""
    stragglers = aggregator.context.stragglers if aggregator.context is not None else frozenset()
    return [u for u in updates if u.client_id not in stragglers]


@register("aggregator.fedavg")
class FedAvg(Aggregator):
    """Federated averaging (McMahan et al., AISTATS 2017, Algorithm 1):
    ``w <- sum_k n_k / n * w_k`` over the round's clients.

    Args:
        weighted: weight each update by its ``num_samples`` (default); ``False`` takes the
            plain mean.
        drop_stragglers: leave out the round's stragglers (``trainer.args.straggler_fraction``),
            as the FedProx paper's FedAvg baseline does; a round of stragglers only keeps the
            global weights.

    YAML:
        aggregator:
          type: fedavg
          args: {weighted: true}
    """

    def __init__(self, weighted: bool = True, drop_stragglers: bool = False) -> None:
        self.weighted = weighted
        self.drop_stragglers = drop_stragglers

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        if self.drop_stragglers:
            updates = without_stragglers(self, updates)
            if not updates:
                return {k: v.clone() for k, v in global_weights.items()}
        coefficients = [u.num_samples if self.weighted else 1.0 for u in updates]
        return weighted_average([u.weights for u in updates], coefficients)
