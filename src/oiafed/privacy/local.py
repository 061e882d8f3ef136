"""Local (sample-level) differential privacy: DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016, Algorithm 1) on every client with Opacus.

Each local step draws a Poisson sample of the client's data (each example independently with
probability ``q = batch_size / n``), computes per-example gradients (Opacus's
``GradSampleModule``), clips each to ``max_grad_norm`` and adds ``N(0, (z max_grad_norm)^2)``
to their sum (Opacus's ``DPOptimizer``). An epoch is ``round(n / batch_size)`` steps. As in
Opacus, ``q`` and the step count derive from the client's data size ``n``, which they (and
the ``num_samples`` it reports) reveal. Each client reports its steps and ``q``; the server
keeps every client's ``(q, steps)`` history and reports the client's epsilon (Opacus's RDP
accountant for Poisson sampling) in its client row, and the largest over all clients so far
as the round's ``epsilon_max``. An update without valid steps and ``q`` is left out.

Randomness: by default (``secure_rng: false``) the Poisson samples come from the fit's
generator and the noise from one seeded from the client's task seed, both derived from the
config's ``seed`` (which the server knows and sends): every runtime trains the same, and
whoever has the seed can remove the noise (a simulation's default). With ``secure_rng: true``
the client draws both from generators seeded with 63 bits of its OS CSPRNG (``secrets``; a
seeded PyTorch generator, not a CSPRNG stream, as Opacus's ``torchcsprng`` option would be,
which is not installed) and uses Opacus's ``secure_mode`` (noise robust to floating-point
attacks); runs are then not reproducible. ``runtime.mode: grpc`` must choose
(``base.checked_secure_rng``).

Resume: a client's ``(q, steps)`` history is saved with the run's state; the steps of the
rounds after the last save, which a resumed run redoes, are added from their ``clients.jsonl``
rows (those updates were sent: redone, they are spent twice), and the resumed run saves its
state at once, before those rows are dropped. Steps of a round cut short before its rows were
written are not known, so not counted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from oiafed.core.learner import Learner
from oiafed.core.types import JSON, ClientUpdate, Outcome
from oiafed.exceptions import ConfigError, PrivacyError
from oiafed.privacy.accounting import local_epsilon
from oiafed.privacy.base import (
    Privacy,
    PrivateTraining,
    checked_number,
    checked_secure_rng,
    require,
    secure_seed,
)
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
EXTRAS_HOOKS = ("fit", "train_epoch", "end_fit")
"""Learner hooks that may train outside DP-SGD or send what it did not train (allowed if
``extras_under_dp``)."""


def _steps_problem(metrics: Mapping[str, object]) -> str | None:
    """Why ``metrics`` (an update's, or its client row) hold no ``(q, steps)`` the accountant
    can count: a ``dp_sample_rate`` in (0, 1] and a whole ``dp_steps`` >= 1."""
    rate, steps = metrics.get(SAMPLE_RATE), metrics.get(STEPS)
    if not (isinstance(rate, float) and 0 < rate <= 1):
        return f"local DP: {SAMPLE_RATE} must be a number in (0, 1], got {rate!r}"
    if not (isinstance(steps, float) and math.isfinite(steps) and steps >= 1
            and steps.is_integer()):
        return f"local DP: {STEPS} must be a whole number >= 1, got {steps!r}"
    return None


class DPSGDTraining:
    """The learner's side of local DP: DP-SGD epochs in place of its own (``PrivateTraining``).

    Args:
        noise_multiplier: z.
        max_grad_norm: the per-example clip norm.
        secure_rng: Poisson samples and noise from the OS CSPRNG (module docstring).
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float,
                 secure_rng: bool = False) -> None:
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.secure_rng = secure_rng
        self._sampling: torch.Generator | None = None
        """The Poisson samples' generator with ``secure_rng`` (else the fit's)."""
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
        generator.manual_seed(secure_seed() if self.secure_rng else derive_seed(seed, PRIVACY))
        self._sampling = (torch.Generator().manual_seed(secure_seed()) if self.secure_rng
                          else None)
        learner.optimizer = optimizers.DPOptimizer(
            learner.optimizer, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * n)), generator=generator,
            secure_mode=self.secure_rng)

    def train_epoch(self, learner: Learner, data: ArrayDataset,
                    generator: torch.Generator) -> dict[str, float]:
        """``round(n / batch_size)`` DP-SGD steps on Poisson samples of ``data``."""
        assert self._wrapped is not None
        self._wrapped.train()
        generator = self._sampling or generator
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
        """Report the steps and sample rate the server's accountant needs.

        Raises:
            PrivacyError: when the fit took no DP-SGD step or its learner counted other steps
                than DP-SGD took (it trained outside DP-SGD: nothing is sent).
        """
        if self.steps == 0 or learner.steps != self.steps:
            raise PrivacyError(
                f"local DP: the learner {type(learner).__name__} took {learner.steps} step(s), "
                f"DP-SGD {self.steps}: it trained outside DP-SGD, so its update is not sent")
        update.metrics[STEPS] = float(self.steps)
        update.metrics[SAMPLE_RATE] = self.sample_rate


@register("privacy.local")
class LocalDP(Privacy):
    """Local (sample-level) DP-SGD on every client with Opacus (module docstring); each
    client's ``epsilon`` in its client row, the largest so far as ``epsilon_max``.

    It composes with any server half and with every client half that leaves the loss and the
    gradients to the learner (``training_step`` and ``before_optimizer_step`` not
    overridden: per-example clipping would not see what they add), that trains only through
    DP-SGD and sends only what it trained (``fit``, ``train_epoch`` and ``end_fit`` not
    overridden, or ``Learner.extras_under_dp``: not Ditto, whose personal model trains
    outside DP-SGD), in 32-bit precision, without personal evaluation
    (``data.local_test_fraction``). A fit that took no DP-SGD step, or other steps than
    DP-SGD's, raises on the client (``PrivacyError``): nothing is sent.

    Args:
        noise_multiplier: z, the noise std over ``max_grad_norm``.
        max_grad_norm: the per-example gradient clip norm.
        target_delta: the delta of the epsilons reported.
        secure_rng: the clients' Poisson samples and noise from their OS CSPRNG, not from
            the seed (module docstring; required under ``runtime.mode: grpc``).

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
                 target_delta: float = 1e-5, secure_rng: bool = False) -> None:
        require("opacus")
        self.noise_multiplier = checked_number(noise_multiplier, "noise_multiplier", zero=True)
        self.max_grad_norm = checked_number(max_grad_norm, "max_grad_norm")
        if not 0 < target_delta < 1:
            raise ConfigError(f"must be in (0, 1), got {target_delta}", "privacy.args.target_delta")
        self.target_delta = target_delta
        self.secure_rng = bool(secure_rng)
        self.history: dict[str, list[list[float]]] = {}
        """Client id -> its ``[sample_rate, steps]`` pairs (one per sample rate)."""
        self.epsilon_max = 0.0

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Refuse a learner whose loss or gradients per-example clipping would not bound, or
        that trains outside DP-SGD or sends what it did not train, and reduced precision."""
        require("opacus")
        checked_secure_rng(cfg)
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
        sends = [hook for hook in EXTRAS_HOOKS
                 if getattr(learner, hook) is not getattr(Learner, hook)]
        if sends and not learner.extras_under_dp:
            raise ConfigError(
                f"privacy.type local covers what DP-SGD trains, but learner "
                f"{cfg.learner.type!r} (aggregator {cfg.aggregator.type!r}) overrides "
                f"{', '.join(sends)} and may train outside DP-SGD or send what it trains "
                "there (Ditto's personal model, say); drop privacy.type local or use another "
                "learner.type",
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
        return DPSGDTraining(self.noise_multiplier, self.max_grad_norm, self.secure_rng)

    def update_problem(self, update: ClientUpdate) -> str | None:
        """Why the accountant cannot count ``update``: no ``dp_sample_rate`` in (0, 1] or no
        whole ``dp_steps`` >= 1 (the trainer leaves it out)."""
        return _steps_problem(update.metrics)

    def observe(self, round_num: int, outcomes: Sequence[Outcome]) -> None:
        """Add each reporting client's steps to its history; put its ``epsilon`` in its
        metrics (its client row) and raise ``epsilon_max``. An update the accountant cannot
        count (``update_problem``) is skipped: the trainer leaves it out."""
        for outcome in outcomes:
            if isinstance(outcome, ClientUpdate) and not self.update_problem(outcome):
                outcome.metrics["epsilon"] = self._add_steps(outcome.client_id, outcome.metrics)

    def count_released(self, rows: Sequence[dict[str, JSON]],
                       client_rows: Iterable[dict[str, JSON]]) -> None:
        """Add the steps of the client rows of the rounds to redo (module docstring)."""
        for row in client_rows:
            cid = row.get("client_id")
            if isinstance(cid, str) and not _steps_problem(row):
                self._add_steps(cid, row)

    def _add_steps(self, client_id: str, metrics: Mapping[str, JSON]) -> float:
        """Add one update's ``(q, steps)`` to the client's history; its epsilon now (which
        ``epsilon_max`` takes in)."""
        rate, steps = float(metrics[SAMPLE_RATE]), float(metrics[STEPS])
        history = [list(pair) for pair in self.history.get(client_id, [])]
        for pair in history:
            if pair[0] == rate:
                pair[1] += steps
                break
        else:
            history.append([rate, steps])
        self.history[client_id] = history
        epsilon = local_epsilon([(q, int(n)) for q, n in history],
                                noise_multiplier=self.noise_multiplier,
                                target_delta=self.target_delta)
        self.epsilon_max = max(self.epsilon_max, epsilon)
        return epsilon

    def round_metrics(self, round_num: int) -> dict[str, float]:
        return {"epsilon_max": self.epsilon_max}

    def state_dict(self) -> dict[str, JSON]:
        return {"history": {cid: [list(p) for p in pairs] for cid, pairs in self.history.items()},
                "epsilon_max": self.epsilon_max}

    def load_state_dict(self, state: dict[str, JSON]) -> None:
        self.history = {cid: [list(p) for p in pairs]
                        for cid, pairs in state.get("history", {}).items()}
        self.epsilon_max = float(state.get("epsilon_max", 0.0))
