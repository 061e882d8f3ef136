"""``oiafed report RUN_DIR``: the run's plots (``report/*.png``) and ``report.html``, written
inside the run folder; of a finished run, one that failed, or one still going."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from oiafed.io import atomic_write_bytes, atomic_write_text
from oiafed.reporting import html
from oiafed.reporting.plots import Plot, png_bytes, report_plots
from oiafed.reporting.progress import tracked
from oiafed.reporting.runs import RunRecord, read_run
from oiafed.run_folder import PLOTS_DIR, REPORT_HTML, RUN_LOG

logger = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 64 * 1024


def write_report(run_dir: str | Path, console: Console | None = None) -> Path:
    """Write the report of the run in ``run_dir``; return the path of ``report.html``.

    Args:
        console: where the progress over the plots is drawn (None: none is shown).

    Raises:
        NotARunFolder: when ``run_dir`` is not a run folder (nothing is written).
        InputError: naming the file, when a file of the run cannot be read (nothing is
            written).
    """
    record = read_run(run_dir)
    plots = report_plots(record)
    drawn = _draw(record, plots, console)
    folder = record.path / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    for plot, png in drawn:
        atomic_write_bytes(folder / plot.file, png)
    page = record.path / REPORT_HTML
    atomic_write_text(page, html.render(record, drawn, _log_tail(record)))
    logger.debug("report of %s: %s", record.path, page)
    return page


def _draw(record: RunRecord, plots: list[Plot], console: Console | None) -> list[tuple[Plot, bytes]]:
    """Each plot's PNG bytes, with a progress bar on ``console``."""
    return [(plot, png_bytes(plot.draw(record)))
            for plot in tracked(plots, "plots", lambda plot: plot.file, console)]


def _log_tail(record: RunRecord) -> str:
    """The last ``html.LOG_TAIL_LINES`` lines of ``run.log`` of a run that failed (else "")."""
    if record.status not in ("failed", "interrupted"):
        return ""
    try:
        with open(record.path / RUN_LOG, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _LOG_TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-html.LOG_TAIL_LINES:])
