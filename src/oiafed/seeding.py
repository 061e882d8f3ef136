"""One ``seed`` drives everything: each random stream is derived from it, never shared.

Streams are derived from ``(seed, stream, *parts)`` (round number, client index...), so a
value never depends on what ran before it: runtimes, execution order and resumed runs all
draw the same numbers.
"""

from __future__ import annotations

import random

import numpy as np
import torch

PARTITION = 1
SAMPLING = 2
INIT = 3
TRAIN = 4
DATA = 5
GLOBAL = 6
"""The process-wide generators (Python's ``random``, NumPy's ``np.random``, torch's) that a
new run seeds before it starts (``seed_global_generators``)."""
STRAGGLERS = 7
ATTACK = 8
LOCAL_TEST = 9
"""Each client's local test split (``data.local_test_fraction``)."""
PERSONAL = 10
"""Personal evaluation: which clients are evaluated, and their fine-tuning's data order."""
PRIVACY = 11
"""Differential privacy's noise: the server's (central, per round) and each client's DP-SGD."""


_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: a bijective, well-mixing 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: int, *parts: int) -> int:
    """A 63-bit seed for ``stream`` at ``parts``, a pure function of its inputs.

    Cheap (a few microseconds): it is drawn for every client in every round.
    """
    value = _splitmix64(seed & _MASK)
    for part in (stream, *parts):
        value = _splitmix64(value ^ (part & _MASK))
    return value >> 1


def rng(seed: int, stream: int, *parts: int) -> np.random.Generator:
    """A NumPy generator for ``stream`` at ``parts``."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *parts]))


def seed_global_generators(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global ``np.random`` and torch's default generator
    from ``seed`` (stream ``GLOBAL``), so callbacks and other code drawing from them in this
    process draw the same numbers in every run of the same config and seed."""
    random.seed(derive_seed(seed, GLOBAL, 0))
    np.random.seed(derive_seed(seed, GLOBAL, 1) & 0xFFFFFFFF)
    torch.default_generator.manual_seed(derive_seed(seed, GLOBAL, 2))
