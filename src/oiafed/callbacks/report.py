"""The ``report`` callback: the run's report written when the run ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oiafed.callbacks.base import Callback
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.core.trainer import Trainer

logger = logging.getLogger(__name__)


@register("callback.report")
class ReportCallback(Callback):
    """Write the run's report (``report/*.png`` and ``report.html`` in the run folder, as
    ``oiafed report`` does) when the run ends, finished or failed, after its
    ``summary.json``. Same as ``report: true`` in the config.

    Args:
        (none)

    YAML:
        callbacks:
          - type: report
    """

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Ask the run folder to call ``write_report`` once the run has ended."""
        at_end = getattr(trainer.recorder, "at_end", None)
        if not isinstance(at_end, list):
            logger.warning("report: this run has no run folder (it was not started by "
                           "oiafed.run); no report is written")
            return
        if report_at_end not in at_end:  # once, with report: true too
            at_end.append(report_at_end)


def report_at_end(run_dir: Path) -> None:
    """Write the report of the run in ``run_dir`` (a ``RunFolder.at_end`` action)."""
    from oiafed.reporting.report import write_report  # matplotlib only when a report is due

    write_report(run_dir)
