"""The seed page's ``PrintProgressCallback``: one plain line per round on standard output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oiafed.callbacks.base import Callback
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult


@register("callback.print_progress")
class PrintProgressCallback(Callback):
    """Print ``Round <n>: accuracy = <accuracy>`` after every round (the seed's example).

    A round that was not evaluated (``eval_every`` > 1) prints accuracy 0.0000, as the seed
    page's example does. For a progress bar and more metrics see ``progress``.

    Args:
        (none)

    Raises:
        (nothing of its own)

    Example:
        >>> oiafed.run("config.yaml", callbacks=[PrintProgressCallback()])
        Round 1: accuracy = 0.3194
        Round 2: accuracy = 0.5250

    YAML:
        callbacks:
          - type: print_progress
    """

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Print the round's accuracy."""
        acc = result.metrics.get("accuracy", 0)
        print(f"Round {round_num}: accuracy = {acc:.4f}")
