"""Small pieces shared by the built-in callbacks: argument checks, monitored metrics, paths.

Private: the public API is the callbacks themselves.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from oiafed.exceptions import ConfigError

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer

MODES = ("max", "min")

EVALUATED_KEYS = ("accuracy", "loss")
"""Metrics every evaluated round has: their presence tells an evaluated round from a skipped one."""


def check_choice(owner: str, name: str, value: Any, options: Iterable[str]) -> str:
    """``value`` if it is one of ``options``; else a ConfigError naming both (and a guess)."""
    options = tuple(options)
    if isinstance(value, str) and value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{owner}: {name} must be one of {', '.join(options)}; got {value!r}.{hint}")


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum`` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_float(
    owner: str, name: str, value: Any, *, minimum: float | None = None, exclusive: bool = False,
    maximum: float | None = None, maximum_exclusive: bool = False,
) -> float:
    """``value`` as a float if it is a finite number in the given range."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(float(value)))
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if maximum_exclusive else value <= maximum
    if not ok:
        low = "" if minimum is None else f"{'>' if exclusive else '>='} {minimum}"
        high = "" if maximum is None else f"{'<' if maximum_exclusive else '<='} {maximum}"
        bounds = " and ".join(part for part in (low, high) if part)
        wanted = f"a finite number {bounds}" if bounds else "a finite number"
        raise ConfigError(f"{owner}: {name} must be {wanted}; got {value!r}")
    return float(value)


def check_metric_name(owner: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}: metric must be a non-empty metric name such as 'accuracy' "
                          f"or 'loss'; got {value!r}")
    return value


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (plain, numpy, one-element tensor); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    return None


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are numbers, as floats (in their order)."""
    found = {}
    for key, value in metrics.items():
        number = as_number(value)
        if number is not None:
            found[str(key)] = number
    return found


def monitored_value(owner: str, metrics: Mapping[str, Any], metric: str) -> float | None:
    """The value of ``metric`` this round, or None on a round that was not evaluated.

    Raises:
        ConfigError: when the metric is missing from an evaluated round (one that has
            ``accuracy`` or ``loss``), or is not a number; the message lists the metrics there.
    """
    if metric in metrics:
        number = as_number(metrics[metric])
        if number is None:
            raise ConfigError(f"{owner}: metric {metric!r} is not a number "
                              f"(got {metrics[metric]!r})")
        return number
    if any(key in metrics for key in EVALUATED_KEYS):
        raise ConfigError(missing_metric_message(owner, metric, metrics))
    return None


def missing_metric_message(owner: str, metric: str, metrics: Iterable[str]) -> str:
    known = sorted(str(k) for k in metrics)
    close = difflib.get_close_matches(metric, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"{owner}: metric {metric!r} is not among the round's metrics "
            f"({', '.join(known) or 'none'}).{hint} A metric that another callback adds is "
            f"only there for callbacks listed after that one.")


def is_better(current: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``current`` beats ``best`` by more than ``min_delta`` (any finite value beats None)."""
    if not math.isfinite(current):
        return False
    if best is None:
        return True
    return current > best + min_delta if mode == "max" else current < best - min_delta


def check_run_path(owner: str, name: str, path: str | Path) -> str:
    """``path`` as text, unless it is relative and leads out of the run folder (a ``..`` left
    after normalising: ``../x``, ``a/../../x``). Absolute paths are the user's explicit choice.

    Raises:
        ConfigError: with ``name`` (the argument) as its key path; ``registry.build`` makes
            it the full key (``callbacks[0].args.save_dir``).
    """
    target = Path(path).expanduser()
    if not target.is_absolute() and Path(os.path.normpath(target)).parts[:1] == ("..",):
        raise ConfigError(f"{owner}: {str(path)!r} leads out of the run folder; a relative path "
                          "must stay inside it (give an absolute path to write elsewhere)", name)
    return str(path)


def resolve_path(trainer: Trainer, path: str | Path, owner: str, name: str) -> Path:
    """``path`` itself when absolute; else inside ``trainer.run_dir`` (the cwd when it is None).

    Raises:
        ConfigError: when a relative ``path`` leads out of that folder (``check_run_path``).
    """
    target = Path(check_run_path(owner, name, path)).expanduser()
    if target.is_absolute():
        return target
    base = getattr(trainer, "run_dir", None)
    return (Path(base) if base is not None else Path.cwd()) / target


class Monitor(Protocol):
    """A callback that watches one metric and remembers its best value and round."""

    metric: str
    mode: str
    best: float | None
    best_round: int | None


def monitor_state(callback: Monitor) -> dict[str, Any]:
    """The JSON-able state every metric-watching callback keeps: metric, mode, best, round."""
    return {"metric": callback.metric, "mode": callback.mode, "best": callback.best,
            "best_round": callback.best_round}


def load_monitor_state(owner: str, callback: Monitor, state: Mapping[str, Any]) -> None:
    """Restore ``monitor_state``'s output, refusing a state that watched another metric/mode."""
    for key in ("metric", "mode"):
        if key in state and state[key] != getattr(callback, key):
            raise ConfigError(f"{owner}: saved state watches {key}={state[key]!r}, "
                              f"this callback {key}={getattr(callback, key)!r}")
    best = state.get("best")
    callback.best = None if best is None else float(best)
    callback.best_round = state.get("best_round")
