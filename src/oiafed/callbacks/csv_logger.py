"""Write one CSV row per round: ``round`` and every metric of the round."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oiafed.callbacks._helpers import as_number, check_run_path, resolve_path
from oiafed.callbacks.base import Callback
from oiafed.exceptions import ConfigError
from oiafed.io import atomic_write_text
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import RoundResult

NAME = "csv_logger"


@register("callback.csv_logger")
class CSVLoggerCallback(Callback):
    """Log each round's metrics as a row of a CSV file (a spreadsheet of the run).

    The first column is ``round``, then every metric in the order it first appeared. A
    metric that shows up in a later round (``accuracy`` when the first rounds were not
    evaluated, ``lr`` from a scheduler) adds a column: the file is rewritten with the new
    header atomically, earlier rows getting an empty cell. A round without some metric also
    gets an empty cell. Numbers are written in full precision (``float(cell)`` gives them
    back exactly). A relative ``filename`` is inside the run folder (``trainer.run_dir``;
    the working directory when there is none) and may not lead out of it (``../x.csv``). A
    fresh run replaces an existing file; a resumed run (``load_state_dict``) keeps the rows
    up to its saved round and drops later ones that an interrupted run wrote (and columns
    only those rows had).

    Args:
        filename: the CSV file.

    Raises:
        ConfigError: in ``__init__`` when ``filename`` is not a file path, or is relative
            and leads out of the run folder.
        OSError: when the file cannot be written.

    State (``state_dict``): the columns and the last round written.

    Example:
        >>> result = oiafed.run("config.yaml", callbacks=[CSVLoggerCallback()])
        >>> rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))

    YAML:
        callbacks:
          - type: csv_logger
            args:
              filename: metrics.csv
    """

    def __init__(self, filename: str = "metrics.csv") -> None:
        if not isinstance(filename, str | os.PathLike) or not str(filename) or \
                str(filename).endswith(("/", os.sep)):
            raise ConfigError(f"{NAME}: filename must be a file path; got {filename!r}")
        self.filename = check_run_path(NAME, "filename", filename)
        self.path: Path | None = None
        self.columns: list[str] = []
        self.last_round = 0
        self._resumed = False
        self._ready = False

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Resolve the path (inside the run folder when relative)."""
        self.path = resolve_path(trainer, self.filename, NAME, "filename")

    def _prepare(self, trainer: Trainer) -> Path:
        """On the first write: start the file afresh, or trim it to the resumed round."""
        if self.path is None:
            self.path = resolve_path(trainer, self.filename, NAME, "filename")
        if not self._ready:
            self._ready = True
            if self._resumed and self.path.exists():
                rows = [row for row in self._read() if _round_of(row) <= self.last_round]
                self._rewrite(self.path, rows)
            else:
                if not self._resumed:
                    self.columns = []
                self._rewrite(self.path, [])
        return self.path

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Append this round's row (rewriting the header first if a metric is new)."""
        path = self._prepare(trainer)
        row = {"round": round_num, **{str(k): _cell(v) for k, v in result.metrics.items()}}
        new = [key for key in row if key not in self.columns]
        if new:
            rows = self._read()
            self.columns += new
            self._rewrite(path, [*rows, row])
        else:
            with open(path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, self.columns, restval="", lineterminator="\n").writerow(row)
        self.last_round = round_num

    def _read(self) -> list[dict[str, str]]:
        if self.path is None or not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def _rewrite(self, path: Path, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO(newline="")
        if self.columns:
            writer = csv.DictWriter(buffer, self.columns, restval="", extrasaction="ignore",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the columns so far and the last round written."""
        return {"columns": list(self.columns), "last_round": self.last_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["last_round"]`` (later rows in the file are dropped)."""
        self.columns = [str(c) for c in state.get("columns", [])]
        self.last_round = int(state.get("last_round", 0))
        self._resumed = True
        self._ready = False


def _round_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("round") or "inf")
    except ValueError:
        return float("inf")


def _cell(value: Any) -> Any:
    """Plain numbers and text as they are; numpy or tensor scalars as floats; else ``str``."""
    if value is None or isinstance(value, str | int | float):
        return value
    number = as_number(value)
    return number if number is not None else str(value)
