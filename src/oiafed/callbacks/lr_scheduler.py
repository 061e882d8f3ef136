"""Change the learners' learning rate from round to round with a PyTorch schedule."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import lr_scheduler

from oiafed.callbacks._helpers import (
    MODES,
    check_choice,
    check_float,
    check_int,
    check_metric_name,
    monitored_value,
)
from oiafed.callbacks.base import Callback
from oiafed.exceptions import ConfigError
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult

NAME = "lr_scheduler"

ARGUMENTS = {
    "step": ("step_size", "gamma"),
    "cosine": ("T_max", "eta_min"),
    "exponential": ("gamma",),
    "multistep": ("milestones", "gamma"),
    "plateau": ("metric", "mode", "factor", "patience", "min_lr"),
}
"""The arguments each ``scheduler_type`` takes; any other one is a ConfigError."""


@register("callback.lr_scheduler")
class LRSchedulerCallback(Callback):
    """Schedule the learning rate the learners use, one step per round.

    The schedule is computed by the real ``torch.optim.lr_scheduler`` class (on a dummy
    optimizer), so the rates match PyTorch's formulas with a round in place of an epoch.
    The base rate is ``trainer.fit_config["lr"]`` at the start of training (``oiafed.run``
    puts the learner's ``lr`` there). Before each round the callback sets
    ``trainer.fit_config["lr"]`` (what the learners train with); after it, it records the
    rate used as ``result.metrics["lr"]`` and steps the schedule. Callbacks listed after
    this one see ``lr`` in the round's metrics, and it is saved with them.

    Types and their arguments (one left out takes the default shown; an argument of another
    type is an error):

    - ``step``: ``lr = base * gamma ** (round // step_size)``; ``step_size=10``, ``gamma=0.1``.
    - ``cosine``: cosine annealing from base to ``eta_min`` over ``T_max`` rounds;
      ``T_max`` defaults to the number of rounds, ``eta_min=0``.
    - ``exponential``: ``lr = base * gamma ** round``; ``gamma`` is required.
    - ``multistep``: times ``gamma`` at each round of ``milestones`` (required); ``gamma=0.1``.
    - ``plateau``: times ``factor`` after ``patience`` evaluated rounds without improvement of
      ``metric``; ``metric="loss"``, ``mode="min"``, ``factor=0.1``, ``patience=10``,
      ``min_lr=0``. Rounds without the metric (skipped by ``eval_every``) are not counted.

    (``round`` above counts finished rounds: the first round uses the base rate.)

    Args:
        scheduler_type: ``step``, ``cosine``, ``exponential``, ``multistep`` or ``plateau``.
        step_size: rounds between decays (``step``).
        gamma: decay factor (``step``, ``exponential``, ``multistep``).
        T_max: rounds of a half cosine period (``cosine``).
        eta_min: the lowest rate (``cosine``).
        milestones: rounds after which the rate is multiplied by ``gamma`` (``multistep``).
        metric: round metric to watch (``plateau``).
        mode: ``"min"`` or ``"max"``: whether lower or higher ``metric`` is better (``plateau``).
        factor: the decay factor, in (0, 1) (``plateau``).
        patience: evaluated rounds without improvement before a decay (``plateau``).
        min_lr: the lowest rate (``plateau``).

    Raises:
        ConfigError: in ``__init__`` for an unknown type, a bad value, a missing required
            argument or one that does not belong to the type; in ``on_train_start`` when
            ``trainer.fit_config`` has no ``lr``; for ``plateau``, in ``on_round_end`` when an
            evaluated round lacks ``metric``.

    State (``state_dict``): the PyTorch scheduler's state (made JSON-able) and the current
    rate; loading it (before or after ``on_train_start``) continues the exact sequence.

    Example:
        >>> schedule = LRSchedulerCallback("cosine", T_max=100)
        >>> result = oiafed.run("config.yaml", callbacks=[schedule])
        >>> [row["lr"] for row in result.history][:2]
        [0.05, 0.04998766400914329]

    YAML:
        callbacks:
          - type: lr_scheduler
            args:
              scheduler_type: cosine
              T_max: 100
    """

    def __init__(
        self,
        scheduler_type: str = "step",
        step_size: int | None = None,
        gamma: float | None = None,
        T_max: int | None = None,
        eta_min: float | None = None,
        milestones: list[int] | None = None,
        metric: str | None = None,
        mode: str | None = None,
        factor: float | None = None,
        patience: int | None = None,
        min_lr: float | None = None,
    ) -> None:
        kind = check_choice(NAME, "scheduler_type", scheduler_type, ARGUMENTS)
        given = {"step_size": step_size, "gamma": gamma, "T_max": T_max, "eta_min": eta_min,
                 "milestones": milestones, "metric": metric, "mode": mode, "factor": factor,
                 "patience": patience, "min_lr": min_lr}
        foreign = [name for name, value in given.items()
                   if value is not None and name not in ARGUMENTS[kind]]
        if foreign:
            raise ConfigError(
                f"{NAME}: {', '.join(foreign)} does not apply to scheduler_type {kind!r}, which "
                f"takes {', '.join(ARGUMENTS[kind])}"
            )
        self.scheduler_type = kind
        self.options = self._options(kind, given)
        self.scheduler: lr_scheduler.LRScheduler | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr: float | None = None
        self._pending: dict[str, Any] | None = None

    @staticmethod
    def _options(kind: str, given: dict[str, Any]) -> dict[str, Any]:
        """Checked keyword arguments of the PyTorch scheduler (T_max None: the round count)."""

        def need(name: str, example: str) -> Any:
            if given[name] is None:
                raise ConfigError(f"{NAME}: scheduler_type {kind!r} needs {name} (e.g. {example})")
            return given[name]

        def pick(name: str, default: Any) -> Any:
            return default if given[name] is None else given[name]

        if kind == "step":
            return {"step_size": check_int(NAME, "step_size", pick("step_size", 10), 1),
                    "gamma": check_float(NAME, "gamma", pick("gamma", 0.1), minimum=0, exclusive=True)}
        if kind == "cosine":
            t_max = given["T_max"]
            return {"T_max": None if t_max is None else check_int(NAME, "T_max", t_max, 1),
                    "eta_min": check_float(NAME, "eta_min", pick("eta_min", 0.0), minimum=0)}
        if kind == "exponential":
            return {"gamma": check_float(NAME, "gamma", need("gamma", "gamma: 0.95"),
                                         minimum=0, exclusive=True)}
        if kind == "multistep":
            milestones = need("milestones", "milestones: [30, 80]")
            if not isinstance(milestones, list | tuple) or not milestones:
                raise ConfigError(f"{NAME}: milestones must be a non-empty list of rounds; "
                                  f"got {milestones!r}")
            return {"milestones": [check_int(NAME, "milestones", m, 1) for m in milestones],
                    "gamma": check_float(NAME, "gamma", pick("gamma", 0.1), minimum=0, exclusive=True)}
        return {
            "metric": check_metric_name(NAME, pick("metric", "loss")),
            "mode": check_choice(NAME, "mode", pick("mode", "min"), MODES),
            "factor": check_float(NAME, "factor", pick("factor", 0.1), minimum=0, exclusive=True,
                                  maximum=1, maximum_exclusive=True),
            "patience": check_int(NAME, "patience", pick("patience", 10), 0),
            "min_lr": check_float(NAME, "min_lr", pick("min_lr", 0.0), minimum=0),
        }

    def _build(self, base_lr: float, rounds: int | None) -> None:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=base_lr)
        opts = self.options
        scheduler: lr_scheduler.LRScheduler
        if self.scheduler_type == "step":
            scheduler = lr_scheduler.StepLR(optimizer, opts["step_size"], opts["gamma"])
        elif self.scheduler_type == "cosine":
            t_max = opts["T_max"] if opts["T_max"] is not None else max(int(rounds or 1), 1)
            scheduler = lr_scheduler.CosineAnnealingLR(optimizer, t_max, opts["eta_min"])
        elif self.scheduler_type == "exponential":
            scheduler = lr_scheduler.ExponentialLR(optimizer, opts["gamma"])
        elif self.scheduler_type == "multistep":
            scheduler = lr_scheduler.MultiStepLR(optimizer, opts["milestones"], opts["gamma"])
        else:
            scheduler = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=opts["mode"], factor=opts["factor"],
                patience=opts["patience"], min_lr=opts["min_lr"])
        self.optimizer, self.scheduler = optimizer, scheduler
        self.lr = self._group_lr()
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._apply(state)

    def _built(self) -> tuple[torch.optim.Optimizer, lr_scheduler.LRScheduler]:
        """The dummy optimizer and the PyTorch scheduler, once ``_build`` made them."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError(f"{NAME}: the schedule is not built before training starts")
        return self.optimizer, self.scheduler

    def _group_lr(self) -> float:
        optimizer, _ = self._built()
        return float(optimizer.param_groups[0]["lr"])

    def _ensure(self, trainer: Trainer) -> None:
        if self.scheduler is not None:
            return
        fit_config = getattr(trainer, "fit_config", None)
        base = None if not isinstance(fit_config, dict) else fit_config.get("lr")
        if isinstance(base, bool) or not isinstance(base, int | float) or not base > 0:
            raise ConfigError(f"{NAME}: needs a learning rate > 0 in trainer.fit_config['lr'] "
                              f"(oiafed.run sets it from learner.args.lr); got {base!r}")
        self._build(float(base), getattr(trainer, "rounds", None))

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Build the schedule from the base rate ``trainer.fit_config["lr"]``."""
        self._ensure(trainer)
        trainer.fit_config["lr"] = self.lr

    async def on_round_start(self, trainer: Trainer, round_num: int, **kwargs: Any) -> None:
        """Give this round's learners the scheduled rate."""
        self._ensure(trainer)
        trainer.fit_config["lr"] = self.lr

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Record the rate used as ``result.metrics["lr"]``, then step to the next rate."""
        self._ensure(trainer)
        optimizer, scheduler = self._built()
        result.metrics["lr"] = self._group_lr()  # == self.lr: the rate this round used
        optimizer.step()  # a no-op (no gradients) that tells PyTorch the round trained
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):  # scheduler_type "plateau"
            value = monitored_value(NAME, result.metrics, self.options["metric"])
            if value is None:
                return
            scheduler.step(value)
        else:
            scheduler.step()
        self.lr = self._group_lr()
        trainer.fit_config["lr"] = self.lr

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the type, the PyTorch scheduler's state and the current rate."""
        if self.scheduler is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "scheduler_type": self.scheduler_type,
            "scheduler": _encode(self.scheduler.state_dict()),
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the schedule of ``state``; before ``on_train_start`` it is applied there."""
        if not state:
            return
        if state.get("scheduler_type") != self.scheduler_type:
            raise ConfigError(f"{NAME}: saved state is of scheduler_type "
                              f"{state.get('scheduler_type')!r}, this one {self.scheduler_type!r}")
        if self.scheduler is None:
            self._pending = dict(state)
        else:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        optimizer, scheduler = self._built()
        scheduler.load_state_dict(_decode(state["scheduler"]))
        self.lr = float(state["lr"])
        optimizer.param_groups[0]["lr"] = self.lr


def _encode(value: Any) -> Any:
    """A scheduler state as strict JSON: Counters and non-finite floats get tagged forms."""
    if isinstance(value, Counter):
        return {"__counter__": [[_encode(k), n] for k, n in sorted(value.items())]}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        return _encode(value.tolist())
    return value


def _decode(value: Any) -> Any:
    """The inverse of ``_encode``."""
    if isinstance(value, dict):
        if set(value) == {"__counter__"}:
            return Counter({_decode(k): n for k, n in value["__counter__"]})
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
