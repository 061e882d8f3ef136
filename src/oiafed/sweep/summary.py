"""A sweep's summary: per grid point, the mean and standard deviation over seeds of one
metric's best and final values and of the rounds to a target (``summary.csv``,
``summary.md``), and one plot per metric of the mean curve with a band of one standard
deviation (``plots/<metric>.png``)."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from oiafed.io import atomic_open, atomic_write_text
from oiafed.reporting.plots import label_axes, new_figure, png_bytes
from oiafed.reporting.runs import MetricSummary, RunRecord, summarize
from oiafed.sweep.grid import Cell

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOTS = "plots"
NOT_PLOTTED = ("round_time", "num_clients", "num_samples")
"""Bookkeeping columns of ``metrics.jsonl`` that get no plot."""
NOT_RECORDED = "no such metric"
"""summary.md's value of a grid point whose finished runs recorded no such metric."""


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of some seeds' values (None: no value; ``std``
    None with fewer than two)."""

    mean: float | None
    std: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        known = [v for v in values if v is not None]
        return cls(statistics.fmean(known) if known else None,
                   statistics.stdev(known) if len(known) > 1 else None, len(known))

    def text(self, digits: int) -> str:
        if self.mean is None:
            return "—"
        mean = f"{self.mean:.{digits}f}"
        return mean if self.std is None else f"{mean} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class PointSummary:
    """One grid point: its values, its finished runs (one per seed) and their spreads;
    ``recorded``: whether a run of it recorded the metric (False: no run did, though some
    finished)."""

    point: tuple[tuple[str, str], ...]
    runs: list[RunRecord]
    best: Spread
    final: Spread
    rounds_to_target: Spread
    recorded: bool = True

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.point) or "base"


def summarize_points(cells: list[Cell], records: dict[Cell, RunRecord], metric: str,
                     target: float | None, higher_is_better: bool | None) -> list[PointSummary]:
    """Each grid point of ``cells`` (in order) with the spreads of its finished runs."""
    points: dict[tuple[tuple[str, str], ...], list[RunRecord]] = {}
    for cell in cells:
        runs = points.setdefault(cell.point, [])
        if cell in records:
            runs.append(records[cell])
    summaries = []
    for point, runs in points.items():
        found: list[MetricSummary] = [summarize(run, metric, target, higher_is_better)
                                      for run in runs if recorded([run], metric)]
        summaries.append(PointSummary(
            point, runs, Spread.of([s.best for s in found]), Spread.of([s.final for s in found]),
            Spread.of([None if s.rounds_to_target is None else float(s.rounds_to_target)
                       for s in found]), recorded=bool(found) or not runs))
    return summaries


def recorded(runs: Iterable[RunRecord], metric: str) -> bool:
    """Whether a round of one of ``runs`` recorded ``metric``."""
    return any(run.series(metric)[0] for run in runs)


def meaning(metric: str) -> str:
    """What ``metric`` measures, for the summary's first line."""
    if metric == "personal_eval_failed":
        return "clients whose personal evaluation failed (left out)"
    if metric == "personal_eval_time":
        return "seconds of the personal evaluation"
    if metric.startswith("personal_"):
        return "of the clients' personal models on their local test sets"
    if metric.startswith("train_"):
        return "of the sampled clients' local training (sample-weighted)"
    if metric in ("accuracy", "loss"):
        return "of the global model on the test set"
    return "as the runs recorded it"


def write_summary(folder: Path, keys: list[str], points: list[PointSummary], seeds: int,
                  metric: str, target: float | None) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and the plots into ``folder``; return their paths."""
    atomic_write_text(folder / SUMMARY_CSV, _csv(keys, points, metric, target))
    atomic_write_text(folder / SUMMARY_MD, _markdown(keys, points, seeds, metric, target))
    written = [folder / SUMMARY_CSV, folder / SUMMARY_MD]
    for name in _metrics(points):
        path = folder / PLOTS / f"{name}.png"
        with atomic_open(path, "wb") as file:
            file.write(png_bytes(curves(points, name)))
        written.append(path)
    return written


def _csv(keys: list[str], points: list[PointSummary], metric: str,
         target: float | None) -> str:
    columns = [*keys, "seeds", f"best_{metric}_mean", f"best_{metric}_std",
               f"final_{metric}_mean", f"final_{metric}_std"]
    if target is not None:
        columns += ["reached_target", "rounds_to_target_mean", "rounds_to_target_std"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for point in points:
        row: list[object] = [*dict(point.point).values(), len(point.runs),
                             point.best.mean, point.best.std, point.final.mean, point.final.std]
        if target is not None:
            row += [point.rounds_to_target.count, point.rounds_to_target.mean,
                    point.rounds_to_target.std]
        writer.writerow(["" if value is None else value for value in row])
    return out.getvalue()


def _markdown(keys: list[str], points: list[PointSummary], seeds: int, metric: str,
              target: float | None) -> str:
    header = [*keys, "seeds", f"best {metric}", f"final {metric}"]
    if target is not None:
        header.append(f"rounds to {metric} {target:g}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in points:
        values = [point.best.text(4), point.final.text(4)]
        if target is not None:
            reached = point.rounds_to_target
            values.append(reached.text(1) + ("" if reached.count == len(point.runs)
                                             else f" ({reached.count}/{len(point.runs)} reached)"))
        if not point.recorded:
            values = [NOT_RECORDED] * len(values)
        cells = [*(v.replace("|", "\\|") for v in dict(point.point).values()),
                 f"{len(point.runs)}/{seeds}", *values]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Mean ± sample standard deviation over seeds; {metric} {meaning(metric)}.\n\n"
            + "\n".join(lines) + "\n")


def _metrics(points: list[PointSummary]) -> list[str]:
    names: dict[str, None] = {}
    for point in points:
        for run in point.runs:
            names.update(dict.fromkeys(n for n in run.metric_names() if n not in NOT_PLOTTED))
    return list(names)


def curves(points: list[PointSummary], metric: str) -> Figure:
    """``metric`` by round: per grid point, the mean over its seeds and a band of one
    standard deviation (where two or more seeds recorded the round)."""
    figure, axes = new_figure(8, 4.5)
    for point in points:
        by_round: dict[int, list[float]] = {}
        for run in point.runs:
            for x, y in zip(*run.series(metric), strict=True):
                by_round.setdefault(x, []).append(y)
        if not by_round:
            continue
        xs = sorted(by_round)
        means = np.array([statistics.fmean(by_round[x]) for x in xs])
        stds = np.array([statistics.stdev(by_round[x]) if len(by_round[x]) > 1 else 0.0
                         for x in xs])
        line, = axes.plot(xs, means, marker="." if len(xs) < 50 else None, label=point.label)
        axes.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.2)
    label_axes(axes, f"{metric} by round (mean ± std over seeds)", "round", metric)
    axes.legend(fontsize="small")
    return figure
