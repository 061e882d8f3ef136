"""Checks on client updates before they are averaged: bad ones are rejected, not mixed in."""

from __future__ import annotations

import math

import torch

from oiafed.core.types import ClientUpdate, Weights


def _nonfinite_key(weights: Weights) -> str | None:
    """The first floating-point tensor of ``weights`` holding a NaN or an infinity."""
    return next((key for key, tensor in weights.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def nonfinite_problems(weights_list: list[Weights]) -> list[str | None]:
    """For state dicts with the same keys and shapes: why each cannot be averaged for its
    non-finite values (None: every value is finite).

    Fast when all is well: one sum per key over all the state dicts (finite exactly when
    every term is, short of an overflow, which only sends us to the exact check).
    """
    if not weights_list:
        return []
    keys = [key for key, tensor in weights_list[0].items() if tensor.is_floating_point()]
    if not keys:
        return [None] * len(weights_list)
    sums = torch.stack([torch.stack([w[key] for w in weights_list]).sum() for key in keys])
    if bool(sums.isfinite().all()):
        return [None] * len(weights_list)
    bad_keys = [_nonfinite_key(weights) for weights in weights_list]
    return [None if key is None else f"{key} holds non-finite values" for key in bad_keys]


def update_problem(update: ClientUpdate, reference: Weights) -> str | None:
    """Why ``update`` cannot be aggregated with weights shaped like ``reference`` (None: fine,
    as far as its form goes: ``nonfinite_problems`` checks the values of many at once).

    Rejects unknown or missing keys, other shapes or dtypes, a negative or non-integer
    ``num_samples`` and non-numeric metrics.
    """
    if not isinstance(update.num_samples, int) or update.num_samples < 0:
        return f"num_samples must be an integer >= 0, got {update.num_samples!r}"
    weights = update.weights
    if not isinstance(weights, dict):
        return f"weights must be a dict of tensors, got {type(weights).__name__}"
    if weights.keys() != reference.keys():
        unknown, missing = weights.keys() - reference.keys(), reference.keys() - weights.keys()
        return f"unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
    for key, expected in reference.items():
        tensor = weights[key]
        if not isinstance(tensor, torch.Tensor):
            return f"{key} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            return (f"{key} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{tuple(expected.shape)} {expected.dtype}")
    for name, value in update.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {name!r} is not a number: {value!r}"
        if name in ("accuracy", "loss") and not math.isfinite(value) and update.num_samples:
            return f"metric {name!r} is not finite: {value!r}"
    return None
