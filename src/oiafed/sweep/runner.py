"""A sweep from start to end: plan it, run the cells not finished yet (with progress on the
console), sum it up."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from oiafed.config import fill_defaults
from oiafed.exceptions import ConfigError
from oiafed.reporting.runs import RunRecord, read_run
from oiafed.sweep.execute import (
    Backend,
    LocalProcesses,
    Outcome,
    RayTasks,
    RoundCounter,
    cell_environment,
    finished,
    run_cells,
)
from oiafed.sweep.grid import Cell, Plan, check_folder, load_cell_config, plan
from oiafed.sweep.lock import sweep_lock
from oiafed.sweep.precheck import check_builds
from oiafed.sweep.summary import recorded, summarize_points, write_summary


@dataclass
class SweepResult:
    """What a sweep did: its folder, the cells skipped (finished before), run, and failed
    (with the end of their error output), and the summary files written."""

    folder: Path
    skipped: list[Cell] = field(default_factory=list)
    ran: list[Cell] = field(default_factory=list)
    failed: dict[Cell, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)


def sweep(
    config: str | Path,
    *,
    settings: list[str],
    overrides: list[str] | None = None,
    seeds: str | None = None,
    sweep_dir: str | Path | None = None,
    jobs: int = 1,
    ray_address: str | None = None,
    metric: str = "accuracy",
    target: float | None = None,
    higher_is_better: bool | None = None,
    console: Console | None = None,
) -> SweepResult:
    """Run the grid of ``settings`` (``KEY=V1,V2``) times ``seeds`` (``"0,1,2"``; default the
    config's seed) and sum it up.

    Every cell's config is checked before anything is written, and every grid point built
    (data and model) as its run would. Each cell is a run folder
    ``<sweep_dir>/<k1=v1,k2=v2>/seed=<s>`` made by ``oiafed run CONFIG OVERRIDES k1=v1 k2=v2
    seed=s`` in its own process (with ``OMP_NUM_THREADS`` = CPUs // ``jobs`` unless set), so
    its metrics are those of that solo run. A cell that finished is skipped; one that was
    interrupted is resumed (``oiafed run --resume``). The sweep folder is locked meanwhile
    (``lock.sweep_lock``).

    Raises:
        ConfigError: naming the key (and value) of a cell whose config is invalid, or that
            differs from the sweep already in ``sweep_dir``; naming ``--metric`` when the
            cells that finished before recorded no such metric; nothing is written.
        InputError: naming the folder, when another sweep runs in it.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    console = console or Console(stderr=True, quiet=True)
    grid = plan(config, list(overrides or []), settings, seeds, sweep_dir)
    check_builds(grid)
    ray = RayTasks(ray_address, os.getcwd()) if ray_address is not None else None
    try:
        grid.folder.mkdir(parents=True, exist_ok=True)
        with sweep_lock(grid.folder) as lock:
            check_folder(grid)  # again: another sweep may have run into it since ``plan``
            result = SweepResult(grid.folder)
            waiting: list[Cell] = []
            for cell in grid.cells:
                (result.skipped if finished(grid.cell_dir(cell)) else waiting).append(cell)
            records = _read(grid, result.skipped)
            if records and not recorded(records.values(), metric):
                raise ConfigError(f"no cell that finished recorded the metric {metric!r}; "
                                  f"they record {', '.join(_metric_names(records.values()))}",
                                  "--metric")
            grid.record()
            console.print(f"sweep {escape(str(grid.folder))}: {len(grid.cells)} cells, "
                          f"{len(result.skipped)} finished before, {len(waiting)} to run",
                          highlight=False, soft_wrap=True)
            backend: Backend = ray or LocalProcesses(os.getcwd(), cell_environment(jobs),
                                                     (lock,))
            _run_with_progress(grid, waiting, backend, jobs, metric, console, result)
            records.update(_read(grid, [cell for cell in waiting if cell not in result.failed]))
            seeds_per_point = len({cell.seed for cell in grid.cells})
            points = summarize_points(grid.cells, records, metric, target, higher_is_better)
            result.written = write_summary(grid.folder, grid.keys, points, seeds_per_point,
                                           metric, target)
    finally:
        if ray is not None:
            ray.stop()  # a cluster started for the sweep ends with it, however it ends
    return result


def _read(grid: Plan, cells: list[Cell]) -> dict[Cell, RunRecord]:
    """The runs of ``cells`` (their ``clients.jsonl`` not read: the summary needs none)."""
    return {cell: read_run(grid.cell_dir(cell), clients=False) for cell in cells}


def _metric_names(records: Iterable[RunRecord]) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.metric_names()))
    return list(names)


def _run_with_progress(grid: Plan, cells: list[Cell], backend: Backend, jobs: int,
                       metric: str, console: Console, result: SweepResult) -> None:
    """Run ``cells`` with a bar over the sweep and one over each running cell's rounds; warn
    when the first cell to finish recorded no ``metric``."""
    rounds = {cell: fill_defaults(load_cell_config(grid, cell)).trainer.args.get("rounds")
              for cell in cells}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("cells", total=len(cells))
        bars: dict[Cell, tuple[TaskID, RoundCounter]] = {}

        def started(cell: Cell) -> None:
            bars[cell] = (progress.add_task(f"  {cell.folder} rounds", total=rounds[cell]),
                          RoundCounter(grid.cell_dir(cell)))

        def ended(outcome: Outcome) -> None:
            cell = outcome.cell
            progress.remove_task(bars.pop(cell)[0])
            progress.advance(overall)
            if outcome.code == 0:
                if not result.ran:
                    _check_metric(grid, cell, metric, progress.console)
                result.ran.append(cell)
                progress.console.print(f"[green]done[/green] {escape(cell.folder)}",
                                       highlight=False, soft_wrap=True)
            else:
                result.failed[cell] = outcome.errors
                progress.console.print(f"[red]failed[/red] {escape(cell.folder)} (exit "
                                       f"{outcome.code})", highlight=False, soft_wrap=True)

        def tick() -> None:
            for bar, counter in bars.values():
                progress.update(bar, completed=counter.count())

        run_cells(grid, cells, backend, jobs, started, ended, tick)


def _check_metric(grid: Plan, cell: Cell, metric: str, console: Console) -> None:
    """Warn when the finished ``cell`` recorded no ``metric``: the summary will have no value
    of it where the other cells do not either."""
    record = read_run(grid.cell_dir(cell), clients=False)
    if not recorded([record], metric):
        console.print(f"[yellow]warning:[/yellow] {escape(cell.folder)} recorded no metric "
                      f"{escape(repr(metric))} (it has {escape(', '.join(record.metric_names()))}"
                      "); the summary shows none where no cell did: run the sweep again with "
                      "another --metric to sum it up (finished cells are not run again)",
                      highlight=False, soft_wrap=True)
