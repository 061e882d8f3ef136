"""Save the global model: every N rounds, at the best round, and after every round."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oiafed.callbacks._helpers import (
    MODES,
    check_choice,
    check_int,
    check_metric_name,
    check_run_path,
    is_better,
    load_monitor_state,
    monitor_state,
    monitored_value,
    numeric_metrics,
    resolve_path,
)
from oiafed.callbacks.base import Callback
from oiafed.exceptions import ConfigError
from oiafed.io import atomic_torch_save
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult

logger = logging.getLogger(__name__)

NAME = "model_checkpoint"
BEST = "best.pt"
LAST = "last.pt"
PERIODIC = re.compile(r"round_(?:[0-9]{4}|[1-9][0-9]{4,18})\.pt")
"""Every name ``periodic_name`` gives for a round in ``[0, 10**19)``, and no other."""


def periodic_name(round_num: int) -> str:
    """The file name of the periodic checkpoint of ``round_num`` (``round_0010.pt``)."""
    return f"round_{round_num:04d}.pt"


def is_periodic_name(name: object) -> bool:
    """Whether ``name`` is a bare file name that ``periodic_name`` gives (no folder, no ``..``)."""
    return isinstance(name, str) and PERIODIC.fullmatch(name) is not None


@register("callback.model_checkpoint")
class ModelCheckpointCallback(Callback):
    """Save the global model's weights to ``save_dir`` as training goes.

    Files, each written atomically (temp file, ``fsync``, rename: a crash never leaves a
    half-written checkpoint, and the previous file stays intact):

    - ``round_0010.pt`` every ``save_every`` rounds (the newest ``keep_last`` are kept);
    - ``best.pt`` whenever ``metric`` reaches a new best (``save_best``);
    - ``last.pt`` after every round.

    Each file holds ``{"weights": state_dict, "round": int, "metrics": {name: float},
    "metric": name}`` and loads with ``torch.load(path, weights_only=True)``; the weights are
    those of the global model at the end of that round (after aggregation). A relative
    ``save_dir`` is inside the run folder (``trainer.run_dir``; the working directory when
    there is none) and may not lead out of it (``../x``); an absolute one may be anywhere.
    Pruning (``keep_last``) deletes only its own ``round_NNNN.pt`` files in ``save_dir``.

    Args:
        save_dir: folder of the checkpoints.
        save_best: keep ``best.pt`` up to date.
        save_every: write ``round_NNNN.pt`` every this many rounds; 0 turns them off.
        metric: the round metric that decides the best round. Rounds without it (skipped by
            ``eval_every``) are never best.
        mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        keep_last: how many periodic files to keep (older ones are deleted); None keeps all.

    Raises:
        ConfigError: in ``__init__`` for a bad argument (naming it and the valid options;
            a relative ``save_dir`` out of the run folder is one); in ``on_round_end`` when
            ``save_best`` is on and an evaluated round lacks ``metric`` (listing the metrics
            it has).
        OSError: when a file cannot be written (the previous file is kept).

    State (``state_dict``): best value and round, the periodic files kept, the last round.

    Example:
        >>> saver = ModelCheckpointCallback(save_every=5, keep_last=2)
        >>> result = oiafed.run("config.yaml", callbacks=[saver])
        >>> torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)["round"]
        17

    YAML:
        callbacks:
          - type: model_checkpoint
            args:
              save_dir: ./checkpoints
              save_best: true
              save_every: 10
              metric: accuracy
              mode: max
              keep_last: 3
    """

    def __init__(
        self,
        save_dir: str = "./checkpoints",
        save_best: bool = True,
        save_every: int = 10,
        metric: str = "accuracy",
        mode: str = "max",
        keep_last: int | None = None,
    ) -> None:
        if not isinstance(save_dir, str | os.PathLike) or not str(save_dir):
            raise ConfigError(f"{NAME}: save_dir must be a folder path; got {save_dir!r}")
        if not isinstance(save_best, bool):
            raise ConfigError(f"{NAME}: save_best must be true or false; got {save_best!r}")
        self.save_dir = check_run_path(NAME, "save_dir", save_dir)
        self.save_best = save_best
        self.save_every = check_int(NAME, "save_every", save_every, 0)
        self.metric = check_metric_name(NAME, metric)
        self.mode = check_choice(NAME, "mode", mode, MODES)
        self.keep_last = None if keep_last is None else check_int(NAME, "keep_last", keep_last, 1)
        self.best: float | None = None
        self.best_round: int | None = None
        self.periodic: list[str] = []
        self.last_round: int | None = None
        self.directory: Path | None = None

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Resolve ``save_dir`` (inside the run folder when relative) and create it."""
        self._folder(trainer)

    def _folder(self, trainer: Trainer) -> Path:
        if self.directory is None:
            self.directory = resolve_path(trainer, self.save_dir, NAME, "save_dir")
            self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Write this round's periodic, best and last checkpoints."""
        folder = self._folder(trainer)
        current, problem = None, None
        if self.save_best:
            try:
                current = monitored_value(NAME, result.metrics, self.metric)
            except ConfigError as exc:  # still write the periodic and last files first
                problem = exc
        if trainer.model is None:
            raise RuntimeError(f"{NAME}: the trainer has no global model to save (trainer.model "
                               "is None)")
        payload = {
            "weights": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
            "round": int(round_num),
            "metrics": numeric_metrics(result.metrics),
            "metric": self.metric,
        }
        if self.save_every and round_num % self.save_every == 0:
            name = periodic_name(round_num)
            atomic_torch_save(payload, folder / name)
            if name in self.periodic:
                self.periodic.remove(name)
            self.periodic.append(name)
            self._prune(folder)
        if current is not None and is_better(current, self.best, self.mode):
            atomic_torch_save(payload, folder / BEST)
            self.best, self.best_round = current, round_num
        atomic_torch_save(payload, folder / LAST)
        self.last_round = round_num
        if problem is not None:
            raise problem

    def _prune(self, folder: Path) -> None:
        if self.keep_last is None:
            return
        while len(self.periodic) > self.keep_last:
            old = self.periodic.pop(0)
            (folder / old).unlink(missing_ok=True)
            logger.debug("%s: removed %s", NAME, old)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able progress: best value and round, periodic files kept, last round saved."""
        return {
            **monitor_state(self),
            "periodic": list(self.periodic),
            "last_round": self.last_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output.

        Only the periodic files it names itself (``round_NNNN.pt``, bare names, so inside
        ``save_dir``) are taken from ``state``: anything else there is ignored with a warning,
        so a crafted state cannot make pruning delete another file.
        """
        load_monitor_state(NAME, self, state)
        saved = state.get("periodic", [])
        names = saved if isinstance(saved, list) else [saved]
        self.periodic = [name for name in names if is_periodic_name(name)]
        foreign = [name for name in names if not is_periodic_name(name)]
        if foreign:
            logger.warning("%s: ignored %d saved periodic file(s) that are not its own "
                           "round_NNNN.pt in %s (they are never deleted): %r", NAME,
                           len(foreign), self.save_dir, foreign[:5])
        self.last_round = state.get("last_round")
