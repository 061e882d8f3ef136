"""``oiafed compare RUN_DIR...``: one metric of several runs side by side (best, final, round
of the best, rounds to a target, wall time) and one plot overlaying them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from oiafed.exceptions import InputError
from oiafed.io import atomic_write_bytes
from oiafed.reporting.plots import overlay, png_bytes
from oiafed.reporting.progress import tracked
from oiafed.reporting.runs import MetricSummary, RunRecord, read_run, summarize


@dataclass(frozen=True)
class Compared:
    """One run of a comparison and its metric's summary."""

    record: RunRecord
    summary: MetricSummary


def compare_runs(run_dirs: Sequence[str | Path], metric: str = "accuracy",
                 target: float | None = None, console: Console | None = None) -> list[Compared]:
    """Read each run and sum up ``metric`` (``runs.summarize``), in the order given.

    Args:
        console: where the progress over the runs is drawn (None: none is shown).

    Raises:
        NotARunFolder: naming the first folder that is not a run folder.
        InputError: naming the run, when ``metric`` is recorded in none of its rounds.
    """
    compared = []
    for run_dir in tracked(run_dirs, "runs", str, console):
        record = read_run(run_dir)
        compared.append(Compared(record, summarize(record, metric, target)))
    return compared


def table(compared: Sequence[Compared], metric: str, target: float | None) -> Table:
    """The comparison as a rich table, one row per run."""
    columns = ["run", "status", "rounds", "best", "final", "best round"]
    if target is not None:
        columns.append(f"rounds to {target:g}")
    columns.append("wall time")
    grid = Table(*columns, title=f"{metric} ({'higher' if _higher(compared) else 'lower'} "
                                 "is better)")
    for item in compared:
        record, summary = item.record, item.summary
        row = [str(record.path), record.status, str(record.rounds_completed),
               _num(summary.best), _num(summary.final), _int(summary.best_round)]
        if target is not None:
            row.append(_int(summary.rounds_to_target, "not reached"))
        so_far = " (so far)" if record.summary is None else ""
        row.append(f"{record.wall_time:.1f} s{so_far}")
        grid.add_row(*row)
    return grid


def write_overlay(compared: Sequence[Compared], metric: str, file: str | Path) -> Path:
    """The plot of ``metric`` by round of every run, written to ``file`` (PNG)."""
    path = Path(file)
    atomic_write_bytes(path, png_bytes(overlay([item.record for item in compared], metric)))
    return path


def check_output(file: str | Path) -> Path:
    """``file`` when a PNG can be written there (its folder exists).

    Raises:
        InputError: naming ``--output``, otherwise.
    """
    path = Path(file)
    if path.suffix.lower() != ".png":
        raise InputError(f"--output: the plot is a PNG file; give a name ending in .png, "
                         f"got {str(file)!r}")
    if not path.parent.is_dir():
        raise InputError(f"--output: the folder {path.parent} does not exist")
    return path


def _higher(compared: Sequence[Compared]) -> bool:
    return all(item.summary.higher_is_better for item in compared)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _int(value: int | None, missing: str = "-") -> str:
    return missing if value is None else str(value)
