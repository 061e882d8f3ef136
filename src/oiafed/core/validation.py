"""Checks on client updates before they are averaged: bad ones are rejected, not mixed in."""

from __future__ import annotations

import math

import torch

from oiafed.core.types import ClientUpdate, Weights
from oiafed.device import CPU

STACK_VALUES = 1 << 20
"""The most values ``distances`` stacks into one tensor (4 MiB of float32): small tensors of
all updates at once, few operations; larger ones update by update, no copy."""
MAX_NUM_SAMPLES = 2**53
"""The largest ``num_samples`` an update may declare: exact as the float64 weight it becomes
(a larger int may not even convert to a float)."""


def _nonfinite_key(weights: Weights) -> str | None:
    """The first floating-point tensor of ``weights`` holding a NaN or an infinity."""
    return next((key for key, tensor in weights.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def nonfinite_problems(weights_list: list[Weights]) -> list[str | None]:
    """For state dicts with the same keys and shapes: why each cannot be averaged for its
    non-finite values (None: every value is finite).

    Fast when all is well: one sum per tensor, no copy (finite exactly when every term is,
    short of an overflow, which only sends us to the exact check).
    """
    if not weights_list:
        return []
    keys = [key for key, tensor in weights_list[0].items() if tensor.is_floating_point()]
    if not keys:
        return [None] * len(weights_list)
    sums = torch.stack([w[key].sum() for key in keys for w in weights_list])
    if bool(sums.isfinite().all()):
        return [None] * len(weights_list)
    bad_keys = [_nonfinite_key(weights) for weights in weights_list]
    return [None if key is None else f"{key} holds non-finite values" for key in bad_keys]


def distances(weights_list: list[Weights], reference: Weights,
              exact: bool = False) -> list[float]:
    """The L2 distance of each of ``weights_list`` from ``reference`` over ``reference``'s
    floating-point tensors: each tensor's difference and norm in its own precision (at least
    float32), the norms combined in float64; ``exact``: all in float64 (weights near float32's
    limits give a large distance where float32 overflows to infinity; never a NaN for finite
    weights). A tensor name whose tensors total at most ``STACK_VALUES`` over the updates is
    measured for all of them in one stacked operation; a larger one update by update, so
    nothing large is copied."""
    if not weights_list:
        return []
    wide = torch.float64 if exact else None
    squared = torch.zeros(len(weights_list), dtype=torch.float64)
    for key, ref in reference.items():
        if not ref.is_floating_point():
            continue
        ref = _widened(ref, wide)
        if ref.numel() * len(weights_list) <= STACK_VALUES:
            diff = torch.stack([_widened(w[key], wide) for w in weights_list]).sub_(ref)
            norms = torch.linalg.vector_norm(diff.reshape(len(weights_list), -1), dim=1)
        else:
            norms = torch.stack([torch.linalg.vector_norm(_widened(w[key], wide) - ref)
                                 for w in weights_list])
        squared += norms.to(CPU, torch.float64).square()
    return squared.sqrt().tolist()


def _widened(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype``, or (None) in at least float32."""
    if dtype is not None:
        return tensor.to(dtype)
    return tensor.float() if tensor.element_size() < 4 else tensor


def distance_problems(weights_list: list[Weights], reference: Weights,
                      ratio: float) -> list[str | None]:
    """For a round's finite updates of ``reference``'s form: why each is too far from the
    round's global weights ``reference`` to be averaged (None: it is not).

    An update is too far when its ``distance`` exceeds ``ratio`` times the median distance
    of the updates that moved (the lower median: of two, the nearer), so one client cannot
    make the round's scale whatever it likes. Updates equal to ``reference`` do not count
    (a client without samples); when none moved, none is too far.
    """
    if not weights_list:
        return []
    return far_problems(distances(weights_list, _beside(weights_list, reference), exact=True),
                        ratio)


def value_problems(weights_list: list[Weights], reference: Weights,
                   ratio: float | None) -> list[str | None]:
    """For a round's well-formed updates of ``reference``'s form: why each cannot be averaged
    for its values: non-finite ones (``nonfinite_problems``) or, with a ``ratio``, too far
    from ``reference`` (``distance_problems``).

    With a ``ratio`` one pass serves both when all is well: finite distances mean finite
    values (a NaN or an infinity makes its distance non-finite)."""
    if ratio is None or not weights_list:
        return nonfinite_problems(weights_list)
    reference = _beside(weights_list, reference)
    found = distances(weights_list, reference)
    if all(math.isfinite(d) for d in found):
        return far_problems(found, ratio)
    # a non-finite value, or a float32 overflow: which, exactly
    problems = nonfinite_problems(weights_list)
    finite = [i for i, problem in enumerate(problems) if problem is None]
    far = distance_problems([weights_list[i] for i in finite], reference, ratio)
    for i, problem in zip(finite, far, strict=True):
        problems[i] = problem
    return problems


def model_is_finite(weights: Weights) -> bool:
    """Whether every floating-point value of ``weights`` is finite: one fused norm per
    tensor (a finite tensor whose norm overflows falls back to the exact check)."""
    tensors = [t for t in weights.values() if t.is_floating_point()]
    if not tensors or bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        return True
    return _nonfinite_key(weights) is None


def _beside(weights_list: list[Weights], reference: Weights) -> Weights:
    """``reference`` on the device of the updates (they arrive on the CPU; the model may not)."""
    first = next(iter(weights_list[0].values()), None)
    if first is None:
        return reference
    return {k: v.to(first.device) for k, v in reference.items()}


def far_problems(found: list[float], ratio: float) -> list[str | None]:
    """``distance_problems`` for distances already measured."""
    moved = sorted(d for d in found if d > 0)
    if not moved:
        return [None] * len(found)
    median = moved[(len(moved) - 1) // 2]
    bound = ratio * median
    return [None if d <= bound else
            f"it is {d:.3g} from the global model, more than max_update_norm_ratio={ratio:g} "
            f"times the round's median distance {median:.3g}" for d in found]


def weights_problem(weights: object, reference: Weights) -> str | None:
    """Why ``weights`` is not a dict of tensors with exactly the keys, shapes and dtypes of
    ``reference`` (None: it is)."""
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
    return None


def update_problem(update: ClientUpdate, reference: Weights) -> str | None:
    """Why ``update`` cannot be aggregated with weights shaped like ``reference`` (None: fine,
    as far as its form goes: ``nonfinite_problems`` checks the values of many at once).

    Rejects unknown or missing keys, other shapes or dtypes, a ``num_samples`` that is not
    an integer in [0, ``MAX_NUM_SAMPLES``] and non-numeric metrics.
    """
    count = update.num_samples
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_NUM_SAMPLES:
        return f"num_samples must be an integer in [0, 2**53], got {count!r:.40}"
    problem = weights_problem(update.weights, reference)
    if problem is not None:
        return problem
    for name, value in update.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric {name!r} is not a number: {value!r}"
        if name in ("accuracy", "loss") and not math.isfinite(value) and update.num_samples:
            return f"metric {name!r} is not finite: {value!r}"
    return None
