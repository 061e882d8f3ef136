"""Local (sample-level) differential privacy: DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016, Algorithm 1) on every client with Opacus.

Each local step draws a Poisson sample of the client's data (each example independently with
probability ``q = batch_size / n``, from the fit's seeded generator), computes per-example
gradients (Opacus's ``GradSampleModule``), clips each to ``max_grad_norm`` and adds
``N(0, (z max_grad_norm)^2)`` to their sum (Opacus's ``DPOptimizer``, its noise drawn from a
generator seeded from the client's task seed, so every runtime trains the same). An epoch is
``round(n / batch_size)`` steps. Each client reports its steps and ``q``; the server keeps
every client's ``(q, steps)`` history and reports the client's epsilon (Opacus's RDP
accountant for Poisson sampling) in its client row, and the largest over all clients so far
as the round's ``epsilon_max``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, Outcome
from oiafed.exceptions import ConfigError
from oiafed.privacy.accounting import local_epsilon
from oiafed.privacy.base import Privacy, PrivateTraining, require
from oiafed.registry import get, register
from oiafed.seeding import PRIVACY, derive_seed

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig
    from oiafed.data.arrays import ArrayDataset

STEPS = "dp_steps"
"""The update metric holding the client's DP-SGD steps this round."""
SAMPLE_RATE = "dp_sample_rate"
"""The update metric holding the client's Poisson sample rate ``q``."""
GRADIENT_HOOKS = ("training_step", "before_optimizer_step")
"""Learner hooks whose gradients per-example clipping would not see (so not allowed)."""


class DPSGDTraining:
    """The learner's side of local DP: DP-SGD epochs in place of its own (``PrivateTraining``).

    Args:
        noise_multiplier: z.
        max_grad_norm: the per-example clip norm.
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float) -> None:
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = 1.0
        self.steps = 0
        self._steps_per_epoch = 1
        self._wrapped: nn.Module | None = None
        self._wrapped_model: nn.Module | None = None

    def begin(self, learner: Learner, seed: int, num_samples: int) -> None:
        """Wrap the learner's model (once) and its new optimizer for DP-SGD."""
        grad_sample = require("opacus.grad_sample")
        optimizers = require("opacus.optimizers")
        model = learner.model
        assert model is not None
        if self._wrapped_model is not model:
            self._wrapped = grad_sample.GradSampleModule(model)
            self._wrapped_model = model
        n = max(num_samples, 1)
        self.sample_rate = min(1.0, learner.batch_size / n)
        self._steps_per_epoch = max(1, round(n / learner.batch_size))
        self.steps = 0
        generator = torch.Generator(device=learner.device)
        generator.manual_seed(derive_seed(seed, PRIVACY))
        learner.optimizer = optimizers.DPOptimizer(
            learner.optimizer, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * n)), generator=generator)

    def train_epoch(self, learner: Learner, data: ArrayDataset,
                    generator: torch.Generator) -> dict[str, float]:
        """``round(n / batch_size)`` DP-SGD steps on Poisson samples of ``data``."""
        assert self._wrapped is not None
        self._wrapped.train()
        loss_sum, correct, seen = 0.0, 0, 0
        with warnings.catch_warnings():
            # Opacus's hooks on a first layer whose input needs no gradient: expected, harmless
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            for _ in range(self._steps_per_epoch):
                found = self._step(learner, data, generator)
                if found is not None:
                    loss_sum += found[0]
                    correct += found[1]
                    seen += found[2]
        if not seen:
            return {"accuracy": math.nan, "loss": math.nan}
        return {"accuracy": correct / seen, "loss": loss_sum / seen}

    def _step(self, learner: Learner, data: ArrayDataset,
              generator: torch.Generator) -> tuple[float, int, int] | None:
        """One DP-SGD step on a Poisson sample; its summed loss, correct and sample count
        (None for an empty sample)."""
        model, optimizer = self._wrapped, learner.optimizer
        assert model is not None and optimizer is not None
        n = len(data)
        chosen = (torch.rand(n, generator=generator) < self.sample_rate).nonzero().squeeze(1)
        optimizer.zero_grad(set_to_none=True)
        found = None
        if len(chosen):
            chosen = chosen.to(data.x.device)
            x, y = data.x[chosen], data.y[chosen]
            logits = model(x)
            loss = learner.loss(logits, y)
            loss.backward()
            found = (loss.item() * len(chosen), int((logits.argmax(dim=1) == y).sum().item()),
                     len(chosen))
        else:  # an empty sample still takes its (noise-only) step, as the accountant counts
            for p in model.parameters():
                if p.requires_grad:
                    # Opacus's per-example gradient attribute: none for an empty sample
                    setattr(p, "grad_sample",  # noqa: B010
                            torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device))
        optimizer.step()
        learner.steps += 1
        self.steps += 1
        return found

    def end(self, learner: Learner, update: ClientUpdate) -> None:
        """Report the steps and sample rate the server's accountant needs."""
        update.metrics[STEPS] = float(self.steps)
        update.metrics[SAMPLE_RATE] = self.sample_rate


@register("privacy.local")
class LocalDP(Privacy):
    """Local (sample-level) DP-SGD on every client with Opacus (module docstring); each
    client's ``epsilon`` in its client row, the largest so far as ``epsilon_max``.

    It composes with any server half and with every client half that leaves the loss and the
    gradients to the learner (``training_step`` and ``before_optimizer_step`` not
    overridden: per-example clipping would not see what they add), in 32-bit precision,
    without personal evaluation (``data.local_test_fraction``).

    Args:
        noise_multiplier: z, the noise std over ``max_grad_norm``.
        max_grad_norm: the per-example gradient clip norm.
        target_delta: the delta of the epsilons reported.

    Raises:
        ConfigError: naming the argument out of range; ``privacy.type`` when Opacus is not
            installed (``pip install oiafed[privacy]``); ``learner.type`` or ``precision``
            for a client half it cannot make private; ``model.type`` for layers Opacus cannot
            compute per-example gradients of (BatchNorm, ...), naming them.

    YAML:
        privacy:
          type: local
          args: {noise_multiplier: 1.0, max_grad_norm: 1.0, target_delta: 1.0e-5}
    """

    def __init__(self, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                 target_delta: float = 1e-5) -> None:
        require("opacus")
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ConfigError(f"must be a finite number >= 0, got {noise_multiplier}",
                              "privacy.args.noise_multiplier")
        if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
            raise ConfigError(f"must be a finite number > 0, got {max_grad_norm}",
                              "privacy.args.max_grad_norm")
        if not 0 < target_delta < 1:
            raise ConfigError(f"must be in (0, 1), got {target_delta}", "privacy.args.target_delta")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.target_delta = target_delta
        self.history: dict[str, list[list[float]]] = {}
        """Client id -> its ``[sample_rate, steps]`` pairs (one per sample rate)."""
        self.epsilon_max = 0.0

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Refuse a learner whose loss or gradients per-example clipping would not bound,
        and reduced precision."""
        require("opacus")
        learner = get("learner", cfg.learner.type, path="learner.type")
        if not (isinstance(learner, type) and issubclass(learner, Learner)):
            raise ConfigError(f"privacy.type local trains with oiafed's Learner; "
                              f"{cfg.learner.type!r} is not one", "learner.type")
        changed = [hook for hook in GRADIENT_HOOKS
                   if getattr(learner, hook) is not getattr(Learner, hook)]
        if changed:
            raise ConfigError(
                f"privacy.type local clips per-example gradients, but learner "
                f"{cfg.learner.type!r} (aggregator {cfg.aggregator.type!r}) changes the loss "
                f"or gradients in {', '.join(changed)}, which that clipping would not bound",
                "learner.type")
        if cfg.precision != "32":
            raise ConfigError(f"privacy.type local trains in 32-bit precision; got "
                              f"{cfg.precision!r}", "precision")
        if cfg.data.local_test_fraction:
            raise ConfigError("privacy.type local cannot cover personal evaluation (it "
                              "fine-tunes and reports each client's metrics outside DP-SGD); "
                              "set it to 0", "data.local_test_fraction")

    def check_model(self, model: nn.Module, model_type: str) -> None:
        """Refuse a model with layers Opacus cannot compute per-example gradients of."""
        validators = require("opacus.validators")
        errors = validators.ModuleValidator.validate(model, strict=False)
        if errors:
            found = "; ".join(str(error) for error in errors[:5])
            raise ConfigError(
                f"privacy.type local (Opacus) cannot train model {model_type!r}: {found}. "
                "Use a model without these layers (GroupNorm for BatchNorm, say)", "model.type")

    def client_training(self) -> PrivateTraining:
        return DPSGDTraining(self.noise_multiplier, self.max_grad_norm)

    def observe(self, round_num: int, outcomes: Sequence[Outcome]) -> None:
        """Add each reporting client's steps to its history; put its ``epsilon`` in its
        metrics (its client row) and raise ``epsilon_max``."""
        for outcome in outcomes:
            if not isinstance(outcome, ClientUpdate):
                continue
            rate, steps = outcome.metrics.get(SAMPLE_RATE), outcome.metrics.get(STEPS)
            if not (isinstance(rate, float) and isinstance(steps, float)
                    and 0 < rate <= 1 and steps >= 0):
                continue  # a malformed update (the trainer leaves it out)
            history = [list(pair) for pair in self.history.get(outcome.client_id, [])]
            for pair in history:
                if pair[0] == rate:
                    pair[1] += steps
                    break
            else:
                history.append([rate, steps])
            self.history[outcome.client_id] = history
            epsilon = local_epsilon([(q, int(n)) for q, n in history],
                                    noise_multiplier=self.noise_multiplier,
                                    target_delta=self.target_delta)
            outcome.metrics["epsilon"] = epsilon
            self.epsilon_max = max(self.epsilon_max, epsilon)

    def round_metrics(self, round_num: int) -> dict[str, float]:
        return {"epsilon_max": self.epsilon_max}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {cid: [list(p) for p in pairs] for cid, pairs in self.history.items()},
                "epsilon_max": self.epsilon_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {cid: [list(p) for p in pairs]
                        for cid, pairs in state.get("history", {}).items()}
        self.epsilon_max = float(state.get("epsilon_max", 0.0))
