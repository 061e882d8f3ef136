"""Read a run folder (finished, failed or still going) into a ``RunRecord``, and sum up one
metric of it (``summarize``). Nothing is written, locked or changed: a run may be writing
the folder at the same time (the last line of a JSON-lines file, cut short, is skipped)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from oiafed.exceptions import InputError, NotARunFolder
from oiafed.jsonl import iter_jsonl, read_jsonl
from oiafed.run_folder import CLIENTS, CONFIG, METRICS, PARTITION, SUMMARY

Status = Literal["completed", "stopped", "failed", "interrupted", "in progress"]
"""``completed``: every round ran; ``stopped``: a callback stopped it early; ``failed`` /
``interrupted``: it ended by an error / Ctrl-C; ``in progress``: no summary of its last
round yet (the run is going on, or was killed outright)."""

LOWER_IS_BETTER = ("loss", "error", "time", "perplexity")
"""Metric names holding one of these words are better when lower (``summarize``'s default)."""


@dataclass(frozen=True)
class RunRecord:
    """What a run folder holds.

    Attributes:
        path: the run folder.
        config: ``config.yaml`` as a mapping (the resolved config the run used).
        config_text: ``config.yaml`` as written.
        rounds: the rows of ``metrics.jsonl``, one per completed round, in round order.
        times_sampled: client id -> rounds it was sampled in (from ``clients.jsonl``; empty
            when no client row was recorded).
        times_failed: client id -> rounds it was sampled in but gave no usable update.
        partition: ``partition.json`` (per-client label counts), None when absent.
        summary: ``summary.json`` when it describes the last round recorded, else None.
        status: see ``Status``.
        stop_reason: why it stopped (``completed``, ``failed: ValueError: ...``, an early
            stopper's reason), None while in progress.
        best_round: the round of best ``accuracy`` (as ``summary.json`` records it), None
            when no round has it.
        wall_time: seconds it ran (``summary.json``'s; in progress: the rounds' ``round_time``
            added up).
    """

    path: Path
    config: dict[str, Any]
    config_text: str
    rounds: list[dict[str, Any]]
    times_sampled: dict[str, int] = field(default_factory=dict)
    times_failed: dict[str, int] = field(default_factory=dict)
    partition: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    status: Status = "in progress"
    stop_reason: str | None = None
    best_round: int | None = None
    wall_time: float = 0.0

    @property
    def name(self) -> str:
        """The run's name: its folder's."""
        return self.path.name

    @property
    def rounds_completed(self) -> int:
        return int(self.rounds[-1]["round"]) if self.rounds else 0

    def metric_names(self) -> list[str]:
        """Every numeric metric some round recorded, in the order first seen (``round`` left out)."""
        names: dict[str, None] = {}
        for row in self.rounds:
            for key, value in row.items():
                if key != "round" and _number(value) is not None:
                    names.setdefault(key, None)
        return list(names)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """``(rounds, values)`` of the rounds that recorded a finite ``metric``."""
        xs, ys = [], []
        for row in self.rounds:
            value = _number(row.get(metric))
            if value is not None:
                xs.append(int(row["round"]))
                ys.append(value)
        return xs, ys


@dataclass(frozen=True)
class MetricSummary:
    """One metric of one run: ``best`` (its best value), ``final`` (the last round's that
    has it), ``best_round``, and ``rounds_to_target`` (the first round reaching ``target``;
    None when none did or no target was given)."""

    metric: str
    higher_is_better: bool
    best: float | None
    final: float | None
    best_round: int | None
    target: float | None = None
    rounds_to_target: int | None = None


def read_run(run_dir: str | Path, *, clients: bool = True) -> RunRecord:
    """Read the run folder ``run_dir``; without ``clients``, ``clients.jsonl`` is not read
    (``times_sampled`` and ``times_failed`` stay empty).

    Raises:
        NotARunFolder: when ``run_dir`` is not a folder, or holds no ``config.yaml``.
        InputError: naming the file, when one of its files cannot be read (a line in the
            middle of ``metrics.jsonl`` that is not JSON, a ``config.yaml`` that is not a
            mapping).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise NotARunFolder(str(path), "no such folder" if not path.exists() else "not a folder")
    if not (path / CONFIG).is_file():
        raise NotARunFolder(str(path), f"no {CONFIG}")
    config_text = _read_text(path / CONFIG)
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path / CONFIG} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path / CONFIG} does not hold a config (a mapping)")
    rounds = [row for row in read_jsonl(path / METRICS) if isinstance(row.get("round"), int)]
    sampled, failed = _client_counts(path / CLIENTS) if clients else ({}, {})
    summary = read_summary(path)
    last = int(rounds[-1]["round"]) if rounds else 0
    if summary is not None and summary.get("rounds_completed") != last:
        summary = None  # an earlier session's summary (a resumed run that is going on)
    stop_reason = str(summary["stop_reason"]) if summary and summary.get("stop_reason") else None
    best = summary.get("best_round") if summary else _best_row(rounds, "accuracy", True)
    wall = _number(summary.get("wall_time")) if summary else None
    return RunRecord(
        path=path, config=config, config_text=config_text, rounds=rounds,
        times_sampled=sampled, times_failed=failed, partition=_read_json(path / PARTITION),
        summary=summary, status=summary_status(summary), stop_reason=stop_reason,
        best_round=best if isinstance(best, int) else None,
        wall_time=wall if wall is not None else sum(
            _number(row.get("round_time")) or 0.0 for row in rounds),
    )


def summarize(record: RunRecord, metric: str = "accuracy", target: float | None = None,
              higher_is_better: bool | None = None) -> MetricSummary:
    """Best, final, round of the best and rounds to ``target`` of ``metric`` in ``record``.

    Args:
        higher_is_better: None: False for names holding a word of ``LOWER_IS_BETTER``.

    Raises:
        InputError: when ``metric`` was recorded in no round (naming the metrics there are).
    """
    higher = (not any(word in metric for word in LOWER_IS_BETTER)
              if higher_is_better is None else higher_is_better)
    xs, ys = record.series(metric)
    if not xs and record.rounds:
        raise InputError(f"{record.path}: no round recorded the metric {metric!r}; it has "
                         f"{', '.join(record.metric_names()) or 'none'}")
    best_index = (max if higher else min)(range(len(ys)), key=ys.__getitem__, default=None)
    reached = None
    if target is not None:
        reached = next((x for x, y in zip(xs, ys, strict=True)
                        if (y >= target if higher else y <= target)), None)
    return MetricSummary(
        metric=metric, higher_is_better=higher,
        best=ys[best_index] if best_index is not None else None,
        final=ys[-1] if ys else None,
        best_round=xs[best_index] if best_index is not None else None,
        target=target, rounds_to_target=reached)


def _client_counts(file: Path) -> tuple[dict[str, int], dict[str, int]]:
    sampled: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for row in iter_jsonl(file):
        client = row.get("client_id")
        if isinstance(client, str):
            sampled[client] += 1
            if "error" in row:
                failed[client] += 1
    return dict(sampled), dict(failed)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` (None when it has none yet), as written: it may describe an
    earlier session of a resumed run (``read_run`` checks it against ``metrics.jsonl``)."""
    return _read_json(run_dir / SUMMARY)


def summary_status(summary: dict[str, Any] | None) -> Status:
    """The status a run's ``summary.json`` gives (``in progress`` without one)."""
    stop_reason = summary.get("stop_reason") if summary else None
    if not isinstance(stop_reason, str) or not stop_reason:
        return "in progress"
    if stop_reason == "completed":
        return "completed"
    if stop_reason == "interrupted":
        return "interrupted"
    if stop_reason.startswith("failed"):
        return "failed"
    return "stopped"


def _best_row(rounds: list[dict[str, Any]], metric: str, higher: bool) -> int | None:
    scored = [(value, int(row["round"])) for row in rounds
              if (value := _number(row.get(metric))) is not None]
    if not scored:
        return None
    pick = max if higher else min
    return pick(scored, key=lambda pair: pair[0])[1]


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (booleans, text and NaN are no metric values)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None


def _read_json(file: Path) -> dict[str, Any] | None:
    """A JSON object file; None when it is absent or not (yet) a whole JSON object (they
    are written atomically, so that is a file of another kind)."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
