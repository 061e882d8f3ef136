"""Write every round's metrics as TensorBoard scalars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oiafed.callbacks._helpers import check_run_path, numeric_metrics, resolve_path
from oiafed.callbacks.base import Callback
from oiafed.exceptions import ConfigError
from oiafed.registry import register

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult, TrainResult

NAME = "tensorboard"


def _summary_writer_class() -> type[SummaryWriter]:
    """``SummaryWriter``, imported on first use (TensorBoard is slow to import)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # pragma: no cover - tensorboard is a dependency of oiafed
        raise ConfigError(f"{NAME}: the tensorboard package is needed "
                          f"(pip install tensorboard): {exc}") from exc
    return SummaryWriter


@register("callback.tensorboard")
class TensorBoardCallback(Callback):
    """TensorBoard event files with one scalar per numeric round metric per round.

    Each round, every number in ``result.metrics`` (``accuracy``, ``loss``,
    ``train_loss``, ``lr`` from an earlier ``lr_scheduler``, ...) is written with
    ``add_scalar(name, value, round_num)`` and flushed, so TensorBoard shows a run while it
    trains. A relative ``log_dir`` is inside the run folder (``trainer.run_dir``; the
    working directory when there is none) and may not lead out of it (``../runs``). View
    with ``tensorboard --logdir <run folder>``.

    The ``SummaryWriter`` is created when training starts, not in ``__init__``, so building
    the callback (say, to validate a config) writes nothing; it is flushed and closed when
    training ends, normally or by an exception (``on_exception``). A run resumed from
    ``state_dict()`` opens its writer with ``purge_step`` set to the first round it will
    write, so rounds that the interrupted run wrote after its last saved state are hidden in
    TensorBoard rather than shown twice.

    Args:
        log_dir: folder of the event files.

    Raises:
        ConfigError: in ``__init__`` when ``log_dir`` is not a path, or is relative and
            leads out of the run folder; in ``on_train_start``
            when the tensorboard package is missing.

    State (``state_dict``): the last round written.

    Example:
        >>> board = TensorBoardCallback(log_dir="tb")
        >>> result = oiafed.run("config.yaml", callbacks=[board])   # -> <run folder>/tb

    YAML:
        callbacks:
          - type: tensorboard
            args:
              log_dir: ./runs
    """

    def __init__(self, log_dir: str = "./runs") -> None:
        if not isinstance(log_dir, str | os.PathLike) or not str(log_dir):
            raise ConfigError(f"{NAME}: log_dir must be a folder path; got {log_dir!r}")
        self.log_dir = check_run_path(NAME, "log_dir", log_dir)
        self.directory: Path | None = None
        self.writer: SummaryWriter | None = None
        self.last_round = 0
        self._resumed_from: int | None = None

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Open the ``SummaryWriter`` in ``log_dir``."""
        self._open(trainer)

    def _open(self, trainer: Trainer) -> SummaryWriter:
        if self.writer is None:
            summary_writer = _summary_writer_class()
            self.directory = resolve_path(trainer, self.log_dir, NAME, "log_dir")
            purge = None if self._resumed_from is None else self._resumed_from + 1
            self._resumed_from = None
            self.writer = summary_writer(log_dir=str(self.directory), purge_step=purge)
        return self.writer

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """One scalar per numeric metric at step ``round_num``; flush."""
        writer = self._open(trainer)
        for key, value in numeric_metrics(result.metrics).items():
            writer.add_scalar(key, value, round_num)
        writer.flush()
        self.last_round = round_num

    async def on_train_end(self, trainer: Trainer, result: TrainResult, **kwargs: Any) -> None:
        """Flush and close the event file."""
        self.close()

    async def on_exception(self, trainer: Trainer, exception: BaseException,
                           **kwargs: Any) -> None:
        """Flush and close the event file as ``on_train_end`` would (the run failed)."""
        self.close()

    def close(self) -> None:
        """Close the writer (a later round opens a new one)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the last round written."""
        return {"last_round": self.last_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["last_round"]``, hiding rounds written after it."""
        self.last_round = int(state.get("last_round", 0))
        self._resumed_from = self.last_round
        if self.writer is not None:  # loaded after on_train_start: reopen with purge_step
            self.close()
