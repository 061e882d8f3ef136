"""One ``seed`` drives everything: each random stream is derived from it, never shared.

Streams are derived from ``(seed, stream, *parts)`` (round number, client index...), so a
value never depends on what ran before it: runtimes, execution order and resumed runs all
draw the same numbers.
"""

from __future__ import annotations

import numpy as np

PARTITION = 1
SAMPLING = 2
INIT = 3
TRAIN = 4
DATA = 5


def derive_seed(seed: int, stream: int, *parts: int) -> int:
    """A 63-bit seed for ``stream`` at ``parts``, a pure function of its inputs."""
    state = np.random.SeedSequence([seed, stream, *parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def rng(seed: int, stream: int, *parts: int) -> np.random.Generator:
    """A NumPy generator for ``stream`` at ``parts``."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *parts]))
