"""Shamir secret sharing (Shamir, CACM 1979) over the prime field of ``PRIME = 2**521 - 1``.

A secret ``s < PRIME`` is the constant term of a random polynomial of degree ``threshold - 1``;
the share of the party at x-coordinate ``x`` (1, 2, ...) is the polynomial's value there. Any
``threshold`` shares give ``s`` back by Lagrange interpolation at 0; fewer reveal nothing about
it. Secure aggregation shares 32-byte secrets (a seed, an X25519 private key), so the field
only has to hold 256 bits; the Mersenne prime 2**521 - 1 is the smallest of its kind above.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from oiafed.exceptions import SecureAggregationError

PRIME = 2**521 - 1
"""The field's modulus (a Mersenne prime)."""


def split(secret: int, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` for the parties at x-coordinates ``xs`` (distinct, in 1..PRIME-1):
    any ``threshold`` of them reconstruct it.

    Raises:
        SecureAggregationError: on a secret outside the field, a threshold below 1, or
            x-coordinates that are repeated, 0 or out of the field.
    """
    points = list(xs)
    if not 0 <= secret < PRIME:
        raise SecureAggregationError("a Shamir secret must lie in [0, PRIME)")
    if threshold < 1:
        raise SecureAggregationError(f"a Shamir threshold must be >= 1, got {threshold}")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise SecureAggregationError("Shamir x-coordinates must be distinct and in 1..PRIME-1")
    coefficients = [secret, *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    return {x: _evaluate(coefficients, x) for x in points}


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret behind ``shares`` (x -> y), from the first ``threshold`` of them.

    Raises:
        SecureAggregationError: with fewer than ``threshold`` shares, or a share outside the
            field.
    """
    if len(shares) < threshold:
        raise SecureAggregationError(f"{len(shares)} Shamir shares, fewer than the threshold "
                                     f"{threshold}")
    points = sorted(shares.items())[:threshold]
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in points):
        raise SecureAggregationError("a Shamir share lies outside the field")
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def _evaluate(coefficients: list[int], x: int) -> int:
    """The polynomial with ``coefficients`` (constant first) at ``x``, by Horner's rule."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
