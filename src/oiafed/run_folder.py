"""The run folder: resolved config, per-round metrics, partition report and summary."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import IO, Any

from oiafed.config import ExperimentConfig, RuntimeConfig
from oiafed.core.types import TrainResult
from oiafed.exceptions import InputError
from oiafed.io import atomic_write_json, atomic_write_text
from oiafed.state import STATE_FILE, Snapshot, StateWriter, take_snapshot

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PARTITION = "partition.json"


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class RunFolder:
    """One run's folder. After each round ``record_round`` appends a line to ``metrics.jsonl``
    and snapshots the resumable state every ``checkpoint_every`` rounds; the snapshot is
    written (``state.safetensors``) at most once per ``checkpoint_interval`` seconds (counted
    from the folder's opening; the first, the last and a stopping round always). A run that
    fails writes the last snapshot kept (``save_pending``), so the state on disk is always
    that of the last completed round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoint_every = 1  # until ``use_policy``
        self.checkpoint_interval = 0.0
        self._saved_round: int | None = None
        self._saved_at = time.monotonic()
        self._pending: tuple[int, Snapshot] | None = None
        self._state_writer = StateWriter(path)
        self._metrics: IO[str] | None = None

    @classmethod
    def open(cls, run_dir: str | Path) -> RunFolder:
        """An existing run folder, to resume (an ``InputError`` if it is not one); call
        ``use_policy`` with its config's runtime section."""
        path = Path(run_dir)
        if not (path / CONFIG).is_file():
            raise InputError(f"cannot resume: {path} is not a run folder (no {CONFIG})")
        return cls(path.resolve())

    def use_policy(self, runtime: RuntimeConfig) -> None:
        """Save the state as ``runtime.checkpoint_every`` / ``checkpoint_interval`` say."""
        self.checkpoint_every = runtime.checkpoint_every
        self.checkpoint_interval = runtime.checkpoint_interval

    @classmethod
    def create(cls, run_dir: str | Path | None, cfg: ExperimentConfig) -> RunFolder:
        """Make ``run_dir`` (default ``<output_dir>/<name>-<timestamp>``) for a new run.

        Raises:
            InputError: if the folder already holds a run (nothing in it is touched).
        """
        if run_dir is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        else:
            path = Path(run_dir)
            if any((path / name).exists() for name in (METRICS, CONFIG, STATE_FILE)):
                raise InputError(f"{path} already holds a run; choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path.resolve())
        folder.use_policy(cfg.runtime)
        return folder

    def write_config(self, cfg: ExperimentConfig) -> None:
        atomic_write_text(self.path / CONFIG, cfg.to_yaml())

    def write_partition(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.path / PARTITION, report)

    def record_round(self, trainer: Any, row: dict[str, Any]) -> None:
        if self._metrics is None:
            self._metrics = open(self.path / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._metrics.flush()  # in the OS's hands: a killed process loses no finished round
        round_num = row["round"]
        if not self.checkpoint_every or round_num % self.checkpoint_every:
            return
        snapshot = take_snapshot(trainer.state_dict(include_history=False))
        if (self._saved_round is None or round_num >= trainer.rounds or trainer.should_stop
                or time.monotonic() - self._saved_at >= self.checkpoint_interval):
            self._write(round_num, snapshot)
        else:
            self._pending = (round_num, snapshot)

    def save_state(self, trainer: Any) -> None:
        """Snapshot the resumable state of ``trainer``; it reaches disk atomically, in the
        background (``close`` waits for it)."""
        if self.checkpoint_every:
            self._write(trainer.round_num, take_snapshot(trainer.state_dict(include_history=False)))

    def save_pending(self) -> None:
        """Write the last snapshot kept back by ``checkpoint_interval``, if any."""
        if self._pending is not None:
            self._write(*self._pending)

    def has_state(self) -> bool:
        """Whether a state file is (or is being) written."""
        return self._saved_round is not None or (self.path / STATE_FILE).exists()

    def _write(self, round_num: int, snapshot: Snapshot) -> None:
        self._state_writer.submit_snapshot(snapshot)
        self._saved_round = round_num
        self._saved_at = time.monotonic()
        self._pending = None

    def close(self) -> None:
        """Close ``metrics.jsonl`` and wait until the last state snapshot is on disk."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._state_writer.close()

    def saved_round(self, round_num: int) -> bool:
        """Whether the state after ``round_num`` is already on disk."""
        return self._saved_round == round_num

    def history_until(self, round_num: int) -> list[dict[str, Any]]:
        """The history of rounds 1..``round_num`` from ``metrics.jsonl``; rows of later rounds
        (which a resumed run redoes) are dropped from the file.

        Raises:
            InputError: when the file lacks one of those rounds.
        """
        rows = [row for row in self.read_metrics() if row.get("round", 0) <= round_num]
        if [row.get("round") for row in rows] != list(range(1, round_num + 1)):
            raise InputError(f"cannot resume: {self.path / METRICS} does not hold rounds "
                             f"1..{round_num} once each, as the saved state needs")
        atomic_write_text(self.path / METRICS, "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def write_summary(self, result: TrainResult) -> None:
        best = result.best()
        atomic_write_json(self.path / SUMMARY, {
            "rounds_completed": result.rounds_completed,
            "stop_reason": result.stop_reason,
            "stopped_by": result.stopped_by,
            "best_round": best["round"] if best else None,
            "best_metrics": best,
            "final_metrics": result.final_metrics,
            "callback_errors": len(result.callback_errors),
            "wall_time": result.wall_time,
        })

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``."""
        file = self.path / METRICS
        if not file.exists():
            return []
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line may be cut short by a kill
                    raise InputError(f"{file} line {i + 1} is not JSON") from None
        return rows
