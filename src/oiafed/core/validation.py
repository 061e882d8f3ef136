"""Checks on client updates before they are averaged: bad ones are rejected, not mixed in."""

from __future__ import annotations

import math

import torch

from oiafed.core.types import ClientUpdate, Weights


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one pass over all of them)."""
    return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())


def update_problem(update: ClientUpdate, reference: Weights) -> str | None:
    """Why ``update`` cannot be aggregated with weights shaped like ``reference`` (None: fine).

    Rejects unknown or missing keys, other shapes or dtypes, non-finite values, a negative or
    non-integer ``num_samples`` and non-numeric metrics.
    """
    if not isinstance(update.num_samples, int) or update.num_samples < 0:
        return f"num_samples must be an integer >= 0, got {update.num_samples!r}"
    weights = update.weights
    if not isinstance(weights, dict):
        return f"weights must be a dict of tensors, got {type(weights).__name__}"
    if weights.keys() != reference.keys():
        unknown, missing = weights.keys() - reference.keys(), reference.keys() - weights.keys()
        return f"unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
    floating = []
    for key, expected in reference.items():
        tensor = weights[key]
        if not isinstance(tensor, torch.Tensor):
            return f"{key} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            return (f"{key} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{tuple(expected.shape)} {expected.dtype}")
        if tensor.is_floating_point():
            floating.append(tensor)
    if floating and not _all_finite(floating):
        bad = next(k for k, t in weights.items()
                   if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        return f"{bad} holds non-finite values"
    for name, value in update.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {name!r} is not a number: {value!r}"
        if name in ("accuracy", "loss") and not math.isfinite(value) and update.num_samples:
            return f"metric {name!r} is not finite: {value!r}"
    return None
