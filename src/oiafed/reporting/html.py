"""``report.html``: one self-contained page (plots inline as data URIs, no script, style or
font fetched from anywhere) saying how a run went."""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from oiafed.reporting.plots import Plot
from oiafed.reporting.runs import RunRecord

SHOWN_METRICS = ("accuracy", "loss", "train_accuracy", "train_loss", "personal_accuracy",
                 "personal_accuracy_median", "personal_accuracy_p10", "personal_accuracy_min",
                 "personal_loss", "personal_clients", "lr", "num_clients", "round_time")
LOG_TAIL_LINES = 40
"""The last lines of ``run.log`` a failed run's report shows."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { margin-bottom: 0.2em; }
.status { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.3em; color: #fff; }
.completed { background: #2a7d2e; } .stopped { background: #2a5d8d; }
.failed, .interrupted { background: #b3261e; } .in-progress { background: #9a6700; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# Marks the page once every plot has loaded (``data-plots="loaded N of M"`` on <body>): a
# reader, or a headless browser's DOM dump, sees at once whether a plot failed to show.
_CHECK_PLOTS = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-plots", "loaded " + loaded.length + " of " + images.length);
  if (loaded.length < images.length) {
    document.getElementById("plot-check").textContent =
      (images.length - loaded.length) + " plot(s) failed to load";
  }
});
"""


def render(record: RunRecord, plots: Sequence[tuple[Plot, bytes]], log_tail: str = "") -> str:
    """The page for ``record`` with ``plots`` (each with its PNG bytes) inline; ``log_tail``:
    the end of ``run.log``, shown for a run that failed."""
    status = record.status
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>oiafed report: {escape(record.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(record.name)}</h1>",
        f'<p><span class="status {status.replace(" ", "-")}">{escape(status)}</span> '
        f"{escape(_status_line(record))}</p>",
        '<p id="plot-check"></p>',
        _facts(record),
        _metrics_table(record),
    ]
    if record.status in ("failed", "interrupted") and log_tail:
        parts.append(f"<h2>End of run.log</h2><pre>{escape(log_tail)}</pre>")
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_figure(plot, png) for plot, png in plots]
    else:
        parts.append("<p>No plot: no round has been recorded yet.</p>")
    parts += [
        "<h2>Resolved config</h2>",
        f"<pre>{escape(record.config_text)}</pre>",
        f"<p><small>Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC by oiafed report "
        f"from {escape(str(record.path))}.</small></p>",
        f"<script>{_CHECK_PLOTS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _status_line(record: RunRecord) -> str:
    planned = _planned_rounds(record)
    of = f" of {planned}" if planned else ""
    if record.status == "in progress":
        return (f"{record.rounds_completed}{of} rounds so far (no summary yet: the run is "
                "going on, or was killed)")
    return f"{record.rounds_completed}{of} rounds; stop reason: {record.stop_reason}"


def _facts(record: RunRecord) -> str:
    rows: list[tuple[str, str]] = [("rounds completed", str(record.rounds_completed))]
    if record.stop_reason:
        rows.append(("stop reason", record.stop_reason))
    stopped_by = (record.summary or {}).get("stopped_by")
    if stopped_by:
        rows.append(("stopped by", str(stopped_by)))
    rows.append(("best round (accuracy)",
                 str(record.best_round) if record.best_round is not None else "none"))
    label = "wall time" if record.summary else "wall time (rounds so far)"
    rows.append((label, f"{record.wall_time:.1f} s"))
    errors = ((record.summary or {}).get("callback_errors") or {}).get("total")
    if errors:
        rows.append(("callback errors", f"{errors} (tracebacks in run.log)"))
    partition = record.partition or {}
    if "num_clients" in partition:
        rows.append(("clients", str(partition["num_clients"])))
    if record.times_sampled:
        rows.append(("clients ever sampled", str(len(record.times_sampled))))
    device = (record.summary or {}).get("device")
    if isinstance(device, dict):
        rows.append(("device", ", ".join(f"{k}={v}" for k, v in device.items())))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _metrics_table(record: RunRecord) -> str:
    """The best and the final round's metrics, side by side."""
    best = next((row for row in record.rounds if row["round"] == record.best_round), None)
    final = record.rounds[-1] if record.rounds else None
    columns = [(f"best (round {best['round']})", best)] if best else []
    if final is not None:
        columns.append((f"final (round {final['round']})", final))
    if not columns:
        return ""
    names = [m for m in SHOWN_METRICS if any(m in row for _, row in columns)]
    head = "<tr><th>metric</th>" + "".join(f"<th>{escape(t)}</th>" for t, _ in columns) + "</tr>"
    body = "".join(
        f"<tr><th>{escape(name)}</th>"
        + "".join(f"<td>{escape(_value(row.get(name)))}</td>" for _, row in columns) + "</tr>"
        for name in names)
    return f"<table>{head}{body}</table>"


def _figure(plot: Plot, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{escape(plot.file.removesuffix(".png"))}">'
            f'<img src="data:image/png;base64,{data}" alt="{escape(plot.title)}">'
            f"<figcaption>{escape(plot.title)}: {escape(plot.caption)} "
            f"({escape(plot.file)})</figcaption></figure>")


def _planned_rounds(record: RunRecord) -> int | None:
    trainer = record.config.get("trainer")
    args = trainer.get("args") if isinstance(trainer, dict) else None
    rounds = args.get("rounds") if isinstance(args, dict) else None
    return rounds if isinstance(rounds, int) else None


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)
