"""A client's update as the integer vector it masks, and a round's unmasked sum back as the
weighted mean the aggregator takes (a ``SecureSum``).

The vector (uint64, Z_{2**64}) holds, in order:

* ``w``: the client's aggregation weight: its ``num_samples`` (``weighted``) or 1;
* ``n``: its ``num_samples``;
* ``n * accuracy`` and ``n * loss`` in fixed point (``METRIC_BITS`` fraction bits, clipped to
  ``METRIC_BOUND``), for the round's sample-weighted training metrics;
* ``w * (update - global)`` for every floating-point tensor of the model (sorted by name),
  first clipped in L2 norm when central DP sets ``clip_norm`` ``C`` (DP-FedAvg's flat
  clipping, ``privacy.central.clip_update``, done by the client), then to ``[-bound, bound]``
  per coordinate, in fixed point (``precision_bits``). The L2 clip is to
  ``C - sqrt(d) * 2**-(precision_bits+1)`` for ``d`` values (``clip_target``): rounding to
  fixed point can lengthen the vector by that much, so what the client sends has norm at
  most ``C``, the sensitivity central DP's noise is calibrated to.

So the server learns ``sum w``, ``sum n``, the sample-weighted mean training accuracy and
loss, and the weighted mean of the clipped updates: nothing of any one client beyond whether
it took part. Integer tensors (step counters) are not aggregated: they keep the global
model's values.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from oiafed.core.types import ClientUpdate, SecureSum, Weights
from oiafed.exceptions import SecureAggregationError, SecureAggregationFailed
from oiafed.privacy.central import clip_update
from oiafed.secagg import quantize
from oiafed.secagg.messages import Encoding

METRIC_BITS = 16
"""Fraction bits of the training metrics in the vector (resolution 2**-16)."""
METRIC_BOUND = 2.0**16
"""Training metrics are clipped to [-METRIC_BOUND, METRIC_BOUND] before encoding."""
HEADER = 4
"""Entries before the model's: weight, sample count, weighted accuracy, weighted loss."""


def float_keys(weights: Weights) -> list[str]:
    """The tensors that are aggregated, in vector order."""
    return sorted(k for k, v in weights.items() if v.is_floating_point())


def vector_length(global_weights: Weights) -> int:
    return HEADER + sum(global_weights[k].numel() for k in float_keys(global_weights))


def client_input(update: ClientUpdate, global_weights: Weights, encoding: Encoding
                 ) -> np.ndarray:
    """``update`` as the vector a client masks (see the module's docstring).

    Raises:
        SecureAggregationError: for non-finite weights, non-finite metrics of a client with
            samples, or a ``clip_norm`` too small for the precision (``clip_target``).
    """
    n = update.num_samples
    weight = n if encoding.weighted else 1
    metrics = [update.metrics.get(name, math.nan) if n else 0.0 for name in ("accuracy", "loss")]
    if not all(math.isfinite(m) for m in metrics):
        raise SecureAggregationError("secure aggregation needs finite accuracy and loss")
    keys = float_keys(global_weights)
    delta = {k: update.weights[k].detach().cpu().double() - global_weights[k].detach().cpu().double()
             for k in keys}
    if encoding.clip_norm is not None:
        length = vector_length(global_weights) - HEADER
        delta, _ = clip_update(delta, clip_target(encoding.clip_norm, encoding.precision_bits,
                                                  length))
    deltas = torch.cat([delta[k].flatten() for k in keys]).numpy() if keys else np.zeros(0)
    if not np.isfinite(deltas).all():
        raise SecureAggregationError("the update holds non-finite values")
    return np.concatenate([
        np.array([weight, n], dtype=np.uint64),
        quantize.encode(np.array(metrics), n, METRIC_BOUND, METRIC_BITS),
        quantize.encode(deltas, weight, encoding.bound, encoding.precision_bits)])


def clip_target(clip_norm: float, precision_bits: int, length: int) -> float:
    """The L2 norm a client clips its ``length`` update values to under central DP's
    ``clip_norm`` ``C``: ``C - sqrt(length) * 2**-(precision_bits+1)``, so that rounding them
    to fixed point (``quantize.norm_growth``) leaves the norm at most ``C``.

    Raises:
        SecureAggregationError: when that is not positive (``clip_norm`` too small for
            ``precision_bits``).
    """
    target = clip_norm - quantize.norm_growth(length, precision_bits)
    if target <= 0:
        raise SecureAggregationError(
            f"privacy.args.clip_norm={clip_norm:g} is below the fixed-point rounding of "
            f"{length} values at precision_bits={precision_bits}: raise "
            "runtime.secure_aggregation.precision_bits")
    return target


def secure_sum(total: np.ndarray, global_weights: Weights, encoding: Encoding,
               members: list[str]) -> SecureSum:
    """The round's ``SecureSum`` from the unmasked ``total`` of ``members``' vectors.

    Raises:
        SecureAggregationFailed: when the weights sum to 0, or to so much that the sum may
            have wrapped around the field (``quantize.fits``).
    """
    weight, samples = int(total[0]), int(total[1])
    if weight == 0:
        raise SecureAggregationFailed("secure aggregation: every surviving client has weight 0 "
                                      "(no samples)")
    if not (quantize.fits(weight, encoding.bound, encoding.precision_bits)
            and quantize.fits(samples, METRIC_BOUND, METRIC_BITS)):
        raise SecureAggregationFailed(
            f"secure aggregation: a total weight of {weight} could wrap around Z_2^64 at "
            f"bound={encoding.bound:g}, precision_bits={encoding.precision_bits}: lower them")
    metrics = (quantize.decode(total[2:HEADER], samples, METRIC_BITS) if samples
               else np.full(2, math.nan))
    summed = torch.from_numpy(quantize.decode(total[HEADER:], 1, encoding.precision_bits))
    update_sum: Weights = {}
    offset = 0
    for key in float_keys(global_weights):
        size = global_weights[key].numel()
        update_sum[key] = summed[offset:offset + size].view(global_weights[key].shape)
        offset += size
    weights: Weights = {  # float64 to the end, then the model's dtype
        key: (tensor.detach().cpu().double() + update_sum[key] / weight).to(tensor.dtype)
        if key in update_sum else tensor.detach().cpu().clone()
        for key, tensor in global_weights.items()}
    return SecureSum(client_id="secure_sum", num_samples=samples,
                     metrics={"accuracy": float(metrics[0]), "loss": float(metrics[1])},
                     weights=weights, members=tuple(members), update_sum=update_sum)
