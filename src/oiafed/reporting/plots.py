"""The report's plots of one run, and the overlay of several (``compare``): matplotlib
figures made without ``pyplot`` (no global state, no display), saved as PNG."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from oiafed.reporting.runs import RunRecord

MAX_HEATMAP_CLIENTS = 100
"""The most clients the label heatmap shows (evenly spaced over the federation beyond it)."""
MAX_BAR_CLIENTS = 100
"""The most clients the sampling plot shows one bar each; beyond it, a histogram of counts."""
MAX_ANNOTATED_CELLS = 400
"""Heatmaps with at most this many cells print each count in its cell."""
DPI = 100


@dataclass(frozen=True)
class Plot:
    """One plot of a report: its file name, title, and a line saying what it shows."""

    file: str
    title: str
    caption: str
    draw: Callable[[RunRecord], Figure]


def report_plots(record: RunRecord) -> list[Plot]:
    """The plots ``record`` has data for, in report order."""
    plots = []
    for metric, train in (("accuracy", "train_accuracy"), ("loss", "train_loss")):
        if record.series(metric)[0] or record.series(train)[0]:
            plots.append(Plot(f"{metric}.png", metric.capitalize(),
                              f"global test {metric} (and the clients' training {metric}) "
                              "by round", _metric_drawer(metric, train)))
    if record.series("personal_accuracy")[0]:
        plots.append(Plot("personal_accuracy.png", "Personal accuracy",
                          "the clients' personal models on their local test sets by round: "
                          "the sample-weighted mean, the median client, the 10th percentile "
                          "and the worst client", _draw_personal))
    if record.series("round_time")[0]:
        plots.append(Plot("round_time.png", "Round time",
                          "seconds each round took", _draw_round_time))
    lrs = record.series("lr")[1]
    if len(set(lrs)) > 1:
        plots.append(Plot("lr.png", "Learning rate", "the learning rate of each round "
                          "(it changed during the run)", _draw_lr))
    if record.times_sampled:
        plots.append(Plot("client_sampling.png", "Client sampling",
                          "rounds each client was sampled in", _draw_sampling))
    if label_counts(record):
        plots.append(Plot("label_histogram.png", "Labels per client",
                          "the partition's label counts per client", _draw_labels))
    return plots


def png_bytes(figure: Figure) -> bytes:
    """``figure`` as PNG bytes (drawn by Agg: no display needed)."""
    buffer = BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def label_counts(record: RunRecord) -> tuple[list[str], np.ndarray] | None:
    """``(client ids, clients x classes counts)`` from ``partition.json``, at most
    ``MAX_HEATMAP_CLIENTS`` clients (evenly spaced over those recorded); None without any."""
    clients = (record.partition or {}).get("clients")
    if not isinstance(clients, dict):
        return None
    rows = [(cid, info["label_counts"]) for cid, info in clients.items()
            if isinstance(info, dict) and isinstance(info.get("label_counts"), list)]
    if not rows:
        return None
    if len(rows) > MAX_HEATMAP_CLIENTS:
        picks = np.linspace(0, len(rows) - 1, MAX_HEATMAP_CLIENTS).round().astype(int)
        rows = [rows[i] for i in picks]
    width = max(len(counts) for _, counts in rows)
    table = np.zeros((len(rows), width))
    for i, (_, counts) in enumerate(rows):
        table[i, :len(counts)] = counts
    return [cid for cid, _ in rows], table


def overlay(records: Sequence[RunRecord], metric: str) -> Figure:
    """``metric`` by round of each run, one line each, labelled by its folder as given."""
    figure, axes = new_figure(8, 4.5)
    for record in records:
        xs, ys = record.series(metric)
        axes.plot(xs, ys, marker="." if len(xs) < 50 else None, label=str(record.path))
    label_axes(axes, f"{metric} by round", "round", metric)
    axes.legend(fontsize="small")
    return figure


def new_figure(width: float = 7, height: float = 4) -> tuple[Figure, Axes]:
    """A figure of ``width`` x ``height`` inches with one pair of axes."""
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def label_axes(axes: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels and a light grid (whole numbers on a ``round`` axis)."""
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if xlabel == "round":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _metric_drawer(metric: str, train: str) -> Callable[[RunRecord], Figure]:
    def draw(record: RunRecord) -> Figure:
        figure, axes = new_figure()
        for name, label in ((metric, f"test {metric} (global model)"),
                            (train, f"train {metric} (clients)")):
            xs, ys = record.series(name)
            if xs:
                axes.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        if record.best_round is not None and metric == "accuracy":
            axes.axvline(record.best_round, color="grey", linestyle=":",
                         label=f"best round ({record.best_round})")
        label_axes(axes, f"{metric} by round", "round", metric)
        axes.legend(fontsize="small")
        return figure

    return draw


PERSONAL_SERIES = (("personal_accuracy", "mean (sample-weighted)"),
                   ("personal_accuracy_median", "median client"),
                   ("personal_accuracy_p10", "10th percentile client"),
                   ("personal_accuracy_min", "worst client"))
"""The personal accuracy plot's lines: the metric and its label."""


def _draw_personal(record: RunRecord) -> Figure:
    figure, axes = new_figure()
    for name, label in PERSONAL_SERIES:
        xs, ys = record.series(name)
        if xs:
            axes.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label,
                      linestyle="-" if name == "personal_accuracy" else "--")
    label_axes(axes, "personal accuracy by round", "round", "accuracy")
    axes.legend(fontsize="small")
    return figure


def _draw_round_time(record: RunRecord) -> Figure:
    figure, axes = new_figure()
    xs, ys = record.series("round_time")
    axes.plot(xs, ys, marker="." if len(xs) < 50 else None)
    label_axes(axes, "round time", "round", "seconds")
    return figure


def _draw_lr(record: RunRecord) -> Figure:
    figure, axes = new_figure()
    xs, ys = record.series("lr")
    axes.step(xs, ys, where="post")
    label_axes(axes, "learning rate", "round", "lr")
    return figure


def _draw_sampling(record: RunRecord) -> Figure:
    figure, axes = new_figure()
    ids = sorted(record.times_sampled, key=_natural)
    counts = np.array([record.times_sampled[cid] for cid in ids])
    if len(ids) <= MAX_BAR_CLIENTS:
        failed = np.array([record.times_failed.get(cid, 0) for cid in ids])
        positions = np.arange(len(ids))
        axes.bar(positions, counts - failed, label="gave an update")
        if failed.any():
            axes.bar(positions, failed, bottom=counts - failed, label="left out (failed)")
            axes.legend(fontsize="small")
        axes.set_xticks(positions, ids if len(ids) <= 30 else [""] * len(ids),
                        rotation=90, fontsize="small")
        label_axes(axes, f"rounds each client was sampled in ({len(ids)} clients)", "client",
               "rounds")
    else:
        axes.hist(counts, bins=min(50, max(1, int(counts.max() - counts.min()) + 1)))
        label_axes(axes, f"how often clients were sampled ({len(ids)} clients sampled)",
               "rounds sampled in", "clients")
    return figure


def _draw_labels(record: RunRecord) -> Figure:
    found = label_counts(record)
    assert found is not None  # report_plots lists this plot only then
    ids, table = found
    recorded = len((record.partition or {}).get("clients", {}))
    total = (record.partition or {}).get("num_clients", recorded)
    figure, axes = new_figure(7, max(3.0, min(12.0, 1.5 + 0.18 * len(ids))))
    image = axes.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="samples")
    if table.size <= MAX_ANNOTATED_CELLS:
        threshold = table.max() / 2
        for (row, col), value in np.ndenumerate(table):
            axes.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize="x-small",
                      color="black" if value > threshold else "white")
    axes.set_xticks(range(table.shape[1]))
    axes.set_yticks(range(len(ids)), ids if len(ids) <= 40 else [""] * len(ids),
                    fontsize="small")
    shown = f"{len(ids)} of {total} clients" if len(ids) < total else f"{len(ids)} clients"
    label_axes(axes, f"label counts per client ({shown})", "class", "client")
    axes.grid(False)
    return figure


def _natural(client_id: str) -> tuple[str, int]:
    """``client_10`` after ``client_9``."""
    head = client_id.rstrip("0123456789")
    tail = client_id[len(head):]
    return head, int(tail) if tail else -1
