"""Fixed-point encoding of updates into the ring Z_{2**64}, where masks are added.

A client's float values ``v`` are clipped to ``[-bound, bound]``, rounded to the nearest
multiple of ``2**-precision_bits`` and multiplied by the client's integer weight ``w`` (its
sample count for a sample-weighted mean, or 1): ``q = w * round(clip(v) * 2**f)``, held as
uint64, so sums wrap modulo 2**64 as the masks need. The sum of a round's ``q`` read as a
signed int64 and divided by ``2**f * sum(w)`` (in float64) is the weighted mean of the clipped
values, off by at most ``2**-(f+1)`` per coordinate (each client's rounding error is at most
half a step, and a weighted mean of errors is no larger than the largest). It is exact (no
wrap-around) while ``sum(w) * bound * 2**f < 2**63``, which ``fits`` checks. Rounding moves a
vector of ``d`` values by at most ``sqrt(d) * 2**-(f+1)`` in L2 norm (``norm_growth``).
"""

from __future__ import annotations

import math

import numpy as np

FIELD_BITS = 64
"""Values and masks live in Z_{2**64} (uint64 arithmetic wraps around by itself)."""
MAX_PRECISION_BITS = 48
"""The most fraction bits (``runtime.secure_aggregation.precision_bits``) a party accepts."""


def max_error(precision_bits: int) -> float:
    """The largest difference, per coordinate, between the decoded weighted mean and the exact
    weighted mean of the clipped values."""
    return 2.0 ** -(precision_bits + 1)


def norm_growth(length: int, precision_bits: int) -> float:
    """The most that rounding ``length`` values to ``precision_bits`` fraction bits can add to
    their L2 norm: ``sqrt(length) * 2**-(precision_bits+1)``."""
    return math.sqrt(length) * max_error(precision_bits)


def fits(total_weight: int, bound: float, precision_bits: int) -> bool:
    """Whether a sum of ``total_weight``-weighted values within ``bound`` cannot wrap around."""
    return total_weight * bound * 2.0**precision_bits < 2.0 ** (FIELD_BITS - 1)


def encode(values: np.ndarray, weight: int, bound: float, precision_bits: int) -> np.ndarray:
    """``weight * round(clip(values, -bound, bound) * 2**precision_bits)`` as uint64 (mod 2**64).

    Non-finite values must not reach here (NaN has no fixed-point form); the caller checks."""
    scaled = np.rint(np.clip(values.astype(np.float64), -bound, bound) * 2.0**precision_bits)
    return (scaled.astype(np.int64) * np.int64(weight)).view(np.uint64)


def decode(total: np.ndarray, total_weight: int, precision_bits: int) -> np.ndarray:
    """The weighted mean (float64) from the sum of a round's ``encode``d vectors."""
    return total.view(np.int64).astype(np.float64) / (2.0**precision_bits * total_weight)
