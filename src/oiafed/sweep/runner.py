"""A sweep from start to end: plan it, run the cells not finished yet (with progress on the
console), sum it up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from oiafed.config import fill_defaults
from oiafed.exceptions import ConfigError
from oiafed.reporting.runs import read_run
from oiafed.sweep.execute import (
    Backend,
    LocalProcesses,
    Outcome,
    RayTasks,
    finished,
    rounds_recorded,
    run_cells,
)
from oiafed.sweep.grid import Cell, Plan, load_cell_config, plan
from oiafed.sweep.summary import summarize_points, write_summary


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

    Every cell's config is checked before anything is written. Each cell is a run folder
    ``<sweep_dir>/<k1=v1,k2=v2>/seed=<s>`` made by ``oiafed run CONFIG OVERRIDES k1=v1 k2=v2
    seed=s`` in its own process, so its metrics are those of that solo run. A cell that
    finished is skipped; one that was interrupted is resumed (``oiafed run --resume``).

    Raises:
        ConfigError: naming the key (and value) of a cell whose config is invalid, or that
            differs from the sweep already in ``sweep_dir``; nothing is written.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    console = console or Console(stderr=True, quiet=True)
    grid = plan(config, list(overrides or []), settings, seeds, sweep_dir)
    backend: Backend = (RayTasks(ray_address, os.getcwd()) if ray_address is not None
                        else LocalProcesses(os.getcwd()))
    grid.folder.mkdir(parents=True, exist_ok=True)
    grid.record()
    result = SweepResult(grid.folder)
    waiting: list[Cell] = []
    for cell in grid.cells:
        (result.skipped if finished(grid.cell_dir(cell)) else waiting).append(cell)
    console.print(f"sweep {escape(str(grid.folder))}: {len(grid.cells)} cells, "
                  f"{len(result.skipped)} finished before, {len(waiting)} to run",
                  highlight=False, soft_wrap=True)
    _run_with_progress(grid, waiting, backend, jobs, console, result)
    records = {cell: read_run(grid.cell_dir(cell)) for cell in grid.cells
               if cell not in result.failed}
    seeds_per_point = len({cell.seed for cell in grid.cells})
    points = summarize_points(grid.cells, records, metric, target, higher_is_better)
    result.written = write_summary(grid.folder, grid.keys, points, seeds_per_point, metric,
                                   target)
    return result


def _run_with_progress(grid: Plan, cells: list[Cell], backend: Backend, jobs: int,
                       console: Console, result: SweepResult) -> None:
    """Run ``cells`` with a bar over the sweep and one over each running cell's rounds."""
    rounds = {cell: fill_defaults(load_cell_config(grid, cell)).trainer.args.get("rounds")
              for cell in cells}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("cells", total=len(cells))
        bars: dict[Cell, TaskID] = {}

        def started(cell: Cell) -> None:
            bars[cell] = progress.add_task(f"  {cell.folder} rounds", total=rounds[cell])

        def ended(outcome: Outcome) -> None:
            cell = outcome.cell
            progress.remove_task(bars.pop(cell))
            progress.advance(overall)
            if outcome.code == 0:
                result.ran.append(cell)
                progress.console.print(f"[green]done[/green] {escape(cell.folder)}",
                                       highlight=False, soft_wrap=True)
            else:
                result.failed[cell] = outcome.errors
                progress.console.print(f"[red]failed[/red] {escape(cell.folder)} (exit "
                                       f"{outcome.code})", highlight=False, soft_wrap=True)

        def tick() -> None:
            for cell, bar in bars.items():
                progress.update(bar, completed=rounds_recorded(grid.cell_dir(cell)))

        run_cells(grid, cells, backend, jobs, started, ended, tick)

