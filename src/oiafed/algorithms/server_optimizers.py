"""Server optimizers on the pseudo-gradient (the FedOpt framework of Reddi et al., ICLR 2021,
"Adaptive Federated Optimization", Algorithm 1).

Each round the clients' sample-weighted average ``x_avg`` (FedAvg's, summed in float64) gives
the pseudo-gradient ``delta = x_avg - x``; a server optimizer turns it into a step ``s`` and the
new global weights are ``x + s``. The sum is written ``x_avg - (delta - s)``: the same value,
and exactly FedAvg's average when ``s == delta`` (FedAvgM with momentum 0 and server_lr 1).

Only the model's floating-point parameters (``RoundContext.parameter_names``, which the
trainer sets each round) are optimized. Every other tensor takes FedAvg's result: floating
buffers (batch norm's ``running_mean``/``running_var``, which an adaptive step could push out
of range, e.g. a negative variance) the weighted average, integer buffers (step counters) the
value of the update with the largest weight. The optimizer state (float64 tensors, one per
parameter) is part of ``state_dict``, so a resumed run continues exactly.

Fallback: with no context, or a context whose ``parameter_names`` is empty (a caller that
does not set it), every floating-point tensor is treated as a parameter, as before the names
existed (exact for a model without floating buffers); a warning says so once per aggregator.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from oiafed.core.aggregators import Aggregator, weighted_average
from oiafed.core.types import ClientUpdate, Weights
from oiafed.exceptions import ConfigError, OiafedError
from oiafed.registry import register

logger = logging.getLogger(__name__)

DEFAULT_SERVER_LR = 0.1
"""FedAdam's and FedYogi's default ``server_lr`` (FedAdagrad's: 0.03); see ``FedOpt``."""


def average_float64(weights_list: Sequence[Weights], coefficients: Sequence[float]) -> Weights:
    """``weighted_average`` with the floating-point averages left in float64.

    The first state dict is handed over in float64, which ``weighted_average`` keeps as the
    result's dtype: the sums are FedAvg's own, so FedAvg's result is this one cast back.
    """
    if not weights_list:
        raise OiafedError("cannot aggregate zero updates")
    first = {key: value.to(torch.float64) if value.is_floating_point() else value
             for key, value in weights_list[0].items()}
    return weighted_average([first, *weights_list[1:]], coefficients)


def _check_lr(value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"must be a finite number > 0, got {value}", "aggregator.args.server_lr")


def _check_decay(name: str, value: float) -> None:
    if not 0 <= value < 1:  # False for NaN too
        raise ConfigError(f"must be in [0, 1), got {value}", f"aggregator.args.{name}")


class ServerOptimizer(Aggregator):
    """An optimizer applied by the server to the pseudo-gradient ``delta`` of each round.

    Subclasses implement ``step(key, delta)``: the float64 change of parameter ``key``,
    keeping their state in ``buffer``. Tensors that are not parameters take FedAvg's result
    (see the module's docstring, also for the fallback when no parameter names are known).

    Args:
        server_lr: the server learning rate (eta).
        weighted: average the clients' weights by ``num_samples`` (default, as ``fedavg``);
            ``False`` takes the plain mean, as Reddi et al.'s Algorithm 2 writes it.
    """

    def __init__(self, server_lr: float, weighted: bool = True) -> None:
        _check_lr(server_lr)
        self.server_lr = server_lr
        self.weighted = weighted
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}
        """Optimizer state: buffer name (``momentum``, ``m``, ``v``) -> parameter -> tensor."""
        self._warned_fallback = False

    @abstractmethod
    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """The change of tensor ``key`` this round (float64), from its pseudo-gradient."""

    def optimized_keys(self, global_weights: Weights) -> frozenset[str]:
        """The keys the optimizer steps: the context's ``parameter_names`` that are
        floating-point tensors of ``global_weights``; every floating-point key when none are
        known (no context, or an empty ``parameter_names``)."""
        floating = {key for key, value in global_weights.items() if value.is_floating_point()}
        names = self.context.parameter_names if self.context is not None else ()
        if names:
            return frozenset(floating.intersection(names))
        if floating and not self._warned_fallback:
            self._warned_fallback = True
            logger.warning("%s: no parameter names in the round context; the server optimizer "
                           "steps every floating-point tensor, buffers included",
                           type(self).__name__)
        return frozenset(floating)

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        coefficients = [u.num_samples if self.weighted else 1.0 for u in updates]
        average = average_float64([u.weights for u in updates], coefficients)
        parameters = self.optimized_keys(global_weights)
        new: Weights = {}
        for key, current in global_weights.items():
            mean = average[key]
            if key not in parameters:
                # FedAvg's result: the float64 average cast back, or (integer buffers) the
                # heaviest update's copy
                new[key] = mean.to(current.dtype) if current.is_floating_point() else mean
                continue
            delta = mean - current.to(torch.float64)
            change = self.step(key, delta)
            new[key] = (mean - (delta - change)).to(current.dtype)
        return new

    def buffer(self, name: str, key: str, like: torch.Tensor, fill: float) -> torch.Tensor:
        """The state tensor ``name`` of weight ``key`` (created as ``fill`` shaped like
        ``like``, float64 on its device)."""
        store = self.buffers.setdefault(name, {})
        tensor = store.get(key)
        if tensor is None:
            tensor = torch.full_like(like, fill, dtype=torch.float64)
        elif tensor.shape != like.shape:
            raise OiafedError(f"{type(self).__name__}: saved {name} of {key!r} has shape "
                              f"{tuple(tensor.shape)}, the model's is {tuple(like.shape)}")
        elif tensor.device != like.device:
            tensor = tensor.to(like.device)
        store[key] = tensor
        return tensor

    def state_dict(self) -> dict[str, Any]:
        # Steps replace the tensors (never in place): what was returned stays as it was.
        return {"buffers": {name: dict(store) for name, store in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {name: {key: tensor.to(torch.float64) for key, tensor in store.items()}
                        for name, store in state.get("buffers", {}).items()}


@register("aggregator.fedavgm")
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu, Qi and Brown, 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification", FedAvgM):
    ``v <- momentum * v + delta``, ``x <- x + server_lr * v`` (``v`` starts at 0).

    The paper writes ``v <- beta v + dw; w <- w - v`` with ``dw = x - x_avg = -delta``.
    Momentum 0 and server_lr 1 give FedAvg exactly (bitwise, tested on full runs).

    Args:
        server_lr: the server learning rate (1: the paper's).
        momentum: beta, in [0, 1) (the paper tries 0.7 to 0.997; effective rate
            ``server_lr / (1 - momentum)``).
        weighted: see ``ServerOptimizer``.

    YAML:
        aggregator:
          type: fedavgm
          args: {server_lr: 1.0, momentum: 0.9}
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9,
                 weighted: bool = True) -> None:
        super().__init__(server_lr, weighted)
        _check_decay("momentum", momentum)
        self.momentum = momentum

    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        velocity = self.momentum * self.buffer("momentum", key, delta, 0.0) + delta
        self.buffers["momentum"][key] = velocity
        return self.server_lr * velocity


class FedOpt(ServerOptimizer):
    """Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2:
    ``m_t = beta1 m_{t-1} + (1 - beta1) delta_t``, a second moment ``v_t`` (per subclass),
    ``x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)``; no bias correction.

    Initialisation: ``m_{-1} = 0`` and ``v_{-1} = tau^2``, the smallest value the algorithm
    allows (``v_{-1} >= tau^2``).

    Default ``server_lr`` (eta): the paper tunes eta per task on a grid (and finds tau = 1e-3
    good everywhere), so no value is the paper's. With ``v`` normalising the step, each
    coordinate moves by about eta per round whatever the size of ``delta``: eta is a
    step in weight units. FedAdam and FedYogi default to 0.1 (Flower's FedAdam default):
    over 10 rounds of the 4-client digits federation, FedAdam's accuracy was best at 0.1 of
    0.003-0.3 with the mlp and the cnn (0.3 failed with the cnn) and near best with logreg;
    FedYogi matched it with logreg. FedAdagrad (no momentum: its first step is the whole
    ``eta sign(delta)``) defaults to 0.03: there 0.1 and above failed with the cnn, and the
    best value ranged from 0.01 (cnn) to 1 (logreg). Tune it for a real task.

    Args:
        server_lr: eta.
        beta1: the first moment's decay, in [0, 1).
        tau: the adaptivity (> 0).
        weighted: see ``ServerOptimizer``.
    """

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, beta1: float = 0.9,
                 tau: float = 1e-3, weighted: bool = True) -> None:
        super().__init__(server_lr, weighted)
        _check_decay("beta1", beta1)
        if not math.isfinite(tau) or tau <= 0:
            raise ConfigError(f"must be a finite number > 0, got {tau}", "aggregator.args.tau")
        self.beta1 = beta1
        self.tau = tau

    @abstractmethod
    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        """``v_t`` from ``v_{t-1}`` and ``delta_t ** 2``."""

    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.beta1 * self.buffer("m", key, delta, 0.0) + (1 - self.beta1) * delta
        v = self.second_moment(self.buffer("v", key, delta, self.tau ** 2), delta * delta)
        self.buffers["m"][key], self.buffers["v"][key] = m, v
        return self.server_lr * m / (v.sqrt() + self.tau)


@register("aggregator.fedadagrad")
class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2): ``v_t = v_{t-1} + delta_t^2``.

    ``beta1`` defaults to 0 (no momentum), the FedAdagrad setting of the paper's experiments
    and of Flower; see ``FedOpt`` for eta.

    YAML:
        aggregator:
          type: fedadagrad
          args: {server_lr: 0.03, tau: 0.001}
    """

    def __init__(self, server_lr: float = 0.03, beta1: float = 0.0,
                 tau: float = 1e-3, weighted: bool = True) -> None:
        super().__init__(server_lr, beta1, tau, weighted)

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        return v + square


class _Decaying(FedOpt):
    """FedOpt with a second-moment decay ``beta2`` in [0, 1) (FedAdam, FedYogi)."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3, weighted: bool = True) -> None:
        super().__init__(server_lr, beta1, tau, weighted)
        _check_decay("beta2", beta2)
        self.beta2 = beta2


@register("aggregator.fedadam")
class FedAdam(_Decaying):
    """FedAdam (Reddi et al., ICLR 2021, Algorithm 2):
    ``v_t = beta2 v_{t-1} + (1 - beta2) delta_t^2``; defaults beta1 0.9, beta2 0.99,
    tau 1e-3 as in the paper; see ``FedOpt`` for eta.

    YAML:
        aggregator:
          type: fedadam
          args: {server_lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.001}
    """

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * square


@register("aggregator.fedyogi")
class FedYogi(_Decaying):
    """FedYogi (Reddi et al., ICLR 2021, Algorithm 2):
    ``v_t = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)``; defaults beta1 0.9,
    beta2 0.99, tau 1e-3 as in the paper; see ``FedOpt`` for eta.

    YAML:
        aggregator:
          type: fedyogi
          args: {server_lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.001}
    """

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * square * torch.sign(v - square)
