"""The privacy spent, from the accountant libraries (never computed by hand here).

Central DP (user level): each round samples ``k`` of the ``n`` clients uniformly without
replacement (``Trainer.select_clients``) and releases the sum of their clipped updates plus
Gaussian noise. dp-accounting's RDP accountant analyses that as
``SampledWithoutReplacementDpEvent(n, k, GaussianDpEvent(.))`` under the *replace-one*
relation (Wang, Balle and Kasiviswanathan, AISTATS 2019, Theorem 27): ``n`` is public and a
neighbouring federation swaps one client's data. Swapping one client moves the clipped sum by
up to ``2 C``, so the event's noise multiplier (noise std over sensitivity) is ``z / 2``.

Local DP (sample level): Opacus's RDP accountant for the Poisson-subsampled Gaussian
(Mironov, Talwar and Zhang, 2019), over every step the client took at its sample rate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from oiafed.privacy.base import require


def central_epsilon(*, num_clients: int, num_sampled: int, noise_multiplier: float,
                    rounds: int, target_delta: float) -> float:
    """Epsilon at ``target_delta`` after ``rounds`` rounds of central DP (module docstring):
    what dp-accounting's ``RdpAccountant`` (replace-one) gives for ``rounds`` self-composed
    ``SampledWithoutReplacementDpEvent(num_clients, num_sampled,
    GaussianDpEvent(noise_multiplier / 2))``. Infinite without noise; 0 after 0 rounds.

    RDP composes additively, so one round's RDP is computed once (it costs ~0.5 s) and
    ``rounds`` times it converted by the library's ``compute_epsilon``."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    rdp = require("dp_accounting.rdp.rdp_privacy_accountant")
    orders, one_round = _round_rdp(num_clients, num_sampled, noise_multiplier)
    epsilon, _ = rdp.compute_epsilon(orders, rounds * one_round, target_delta)
    return float(epsilon)


@functools.lru_cache(maxsize=64)
def _round_rdp(num_clients: int, num_sampled: int,
               noise_multiplier: float) -> tuple[tuple[float, ...], np.ndarray]:
    """The library's orders and one round's RDP at them (read-only: it is shared)."""
    dpa = require("dp_accounting")
    rdp = require("dp_accounting.rdp.rdp_privacy_accountant")
    accountant = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dpa.SampledWithoutReplacementDpEvent(
        num_clients, num_sampled, dpa.GaussianDpEvent(noise_multiplier / 2)))
    # The accountant keeps its RDP curve private (``_rdp``, ``_orders``); it is read once here,
    # never changed. The public path (compose ``rounds`` events, ``get_epsilon``) redoes this
    # round's ~0.5 s analysis on every call (each round, the budget callback twice), hence the
    # pin dp-accounting>=0.6,<0.7 in pyproject.toml; tests/test_privacy.py checks the result
    # against the public path.
    one_round = np.array(accountant._rdp, dtype=float)
    one_round.flags.writeable = False
    return tuple(accountant._orders), one_round


def local_epsilon(history: Sequence[tuple[float, int]], *, noise_multiplier: float,
                  target_delta: float) -> float:
    """Epsilon at ``target_delta`` of one client's DP-SGD over ``history``, its
    ``(sample_rate, steps)`` pairs (Poisson sampling): what Opacus's ``RDPAccountant`` with
    that history gives (its orders, ``compute_rdp`` and ``get_privacy_spent``), with each
    rate's one-step RDP computed once (RDP is linear in the steps)."""
    steps = [(q, n) for q, n in history if n > 0]
    if not steps:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    analysis = require("opacus.accountants.analysis.rdp")
    orders = _opacus_orders()
    rdp = sum(n * _step_rdp(q, noise_multiplier) for q, n in steps)
    epsilon, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=target_delta)
    return float(epsilon)


@functools.cache
def _opacus_orders() -> tuple[float, ...]:
    return tuple(require("opacus.accountants").RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """One DP-SGD step's RDP at Opacus's orders (read-only: it is shared)."""
    analysis = require("opacus.accountants.analysis.rdp")
    rdp = np.asarray(analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                          steps=1, orders=list(_opacus_orders())), dtype=float)
    rdp.flags.writeable = False
    return rdp
