"""The ``oiafed report`` and ``oiafed compare`` commands (matplotlib is imported only when
one of them runs)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.measure import Measurement


def add_report_commands(
        commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report`` and ``compare`` to the ``oiafed`` subcommands (``commands``: what
    ``ArgumentParser.add_subparsers`` returned)."""
    report = commands.add_parser(
        "report", help="write a run's plots and report.html inside its folder",
        description="Plot a run (finished, failed or still going) and write report.html, one "
                    "self-contained page (plots inline), in its folder; the plots are also "
                    "in RUN_DIR/report/.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    compare = commands.add_parser(
        "compare", help="compare runs: a table of one metric and one overlay plot",
        description="Print, for each run, the best and final value of METRIC, the round of "
                    "the best, the rounds to --target and the wall time; write one plot "
                    "overlaying METRIC by round of every run.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    compare.add_argument("--metric", default="accuracy",
                         help="a round metric (default: accuracy; names with loss, error, time "
                              "are better lower)")
    compare.add_argument("--target", type=float, metavar="VALUE",
                         help="count the rounds each run took to reach VALUE")
    compare.add_argument("--output", metavar="PNG",
                         help="the overlay plot (default: compare-METRIC.png here)")
    compare.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def report_command(args: argparse.Namespace, console: Console) -> None:
    """``oiafed report RUN_DIR``: print where ``report.html`` was written."""
    from oiafed.reporting.report import write_report

    page = write_report(args.run_dir, None if args.quiet else Console(stderr=True))
    console.print(f"report: {page}", highlight=False, soft_wrap=True)


def compare_command(args: argparse.Namespace, console: Console) -> None:
    """``oiafed compare RUN_DIR...``: the table on standard output, then the plot's path."""
    from oiafed.reporting.compare import check_output, compare_runs, table, write_overlay

    output = check_output(args.output or f"compare-{args.metric}.png")
    compared = compare_runs(args.run_dirs, args.metric, args.target,
                            None if args.quiet else Console(stderr=True))
    grid = table(compared, args.metric, args.target)
    if not console.is_terminal:  # piped or captured: the whole table, however wide
        width = Measurement.get(console, console.options.update_width(10_000), grid).maximum
        console = Console(file=console.file, width=max(width, console.width))
    console.print(grid)
    path = write_overlay(compared, args.metric, output)
    console.print(f"plot: {path}", highlight=False, soft_wrap=True)
