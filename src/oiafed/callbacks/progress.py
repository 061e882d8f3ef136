"""Console progress: a bar over rounds and one line per round."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from oiafed.callbacks.base import Callback
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult, TrainResult

SHOWN = ("accuracy", "loss", "train_accuracy", "train_loss", "num_clients", "round_time")


def format_metrics(metrics: dict[str, Any], keys: tuple[str, ...] = SHOWN) -> str:
    """``accuracy=0.9312  loss=0.2210 ...`` for the keys present."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key}={value:.4f}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return "  ".join(parts)


@register("callback.progress")
class ProgressCallback(Callback):
    """A rich progress bar over rounds and one line of metrics per round (to stderr).

    The bar is live from ``on_train_start`` until the run ends, normally or by an exception
    (``on_exception``): either way it is stopped and the terminal restored.

    Args:
        console: the rich ``Console`` to draw on (default: standard error).

    YAML:
        callbacks:
          - type: progress
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        self._progress = Progress(
            TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("rounds", total=trainer.rounds,
                                             completed=trainer.round_num)

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        line = f"round {round_num:>4}  {format_metrics(result.metrics)}"
        if self._progress is None or self._task is None:
            self.console.print(line, highlight=False, soft_wrap=True)
            return
        self._progress.console.print(line, highlight=False, soft_wrap=True)
        self._progress.update(self._task, completed=round_num)

    async def on_train_end(self, trainer: Trainer, result: TrainResult, **kwargs: Any) -> None:
        self._stop()

    async def on_exception(self, trainer: Trainer, exception: BaseException,
                           **kwargs: Any) -> None:
        """Stop the bar as ``on_train_end`` would (the run ended by ``exception``)."""
        self._stop()

    def _stop(self) -> None:
        """Stop the live bar (restoring the terminal); a later ``on_train_start`` starts anew."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
