"""The ``oiafed sweep`` subcommand: its arguments and what it prints."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from oiafed.exceptions import InputError

DESCRIPTION = (
    "Run CONFIG for every combination of the --set values and every seed: each cell a run "
    "folder SWEEP_DIR/<key=value,...>/seed=<s> made by `oiafed run` in its own process; "
    "every grid point's data and model are built first, to refuse a bad config before any "
    "cell runs. Started again, the sweep skips finished cells and resumes interrupted ones "
    "(more values or seeds of the same keys extend it); one sweep at a time runs in a folder "
    "(SWEEP_DIR/.lock; another is exit 2). Then it writes summary.csv, summary.md (mean ± std "
    "over seeds of the metric's best and final values and of the rounds to --target) and "
    "plots/<metric>.png.")


def add_sweep_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``oiafed sweep`` to the ``oiafed`` command's subcommands."""
    cmd = commands.add_parser("sweep", help="run a grid of configs and seeds, sum it up",
                              description=DESCRIPTION)
    cmd.add_argument("config", help="path of the YAML config")
    cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="overrides of every cell, e.g. trainer.args.rounds=20")
    cmd.add_argument("--set", dest="settings", action="append", default=[],
                     metavar="KEY=V1,V2", help="a swept key and its values (repeat for a grid; "
                     "values are YAML, split at commas outside brackets)")
    cmd.add_argument("--seeds", metavar="S1,S2", help="seeds of every grid point (default: "
                     "the config's seed)")
    cmd.add_argument("--jobs", type=int, metavar="N", help="cells run at a time (default 1; "
                     "with --ray, as many as the cluster takes); each cell gets "
                     "OMP_NUM_THREADS=CPUs//N unless it is set")
    cmd.add_argument("--sweep-dir", metavar="DIR",
                     help="the sweep folder (default: <output_dir>/<name>-sweep)")
    cmd.add_argument("--ray", metavar="ADDRESS", dest="ray_address",
                     help="run the cells as Ray tasks on this cluster (auto, HOST:PORT, or "
                          "local: one started for the sweep); every node must see the config "
                          "and the sweep folder at the same paths")
    cmd.add_argument("--metric", default="accuracy", help="metric summed up (default accuracy)")
    cmd.add_argument("--target", type=float, help="report the rounds to reach this value")
    direction = cmd.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher", action="store_const", const=True,
                           help="default unless the metric's name holds loss, error or time")
    direction.add_argument("--lower-is-better", dest="higher", action="store_const", const=False)
    cmd.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def sweep_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``oiafed sweep``; 1 when a cell failed (the others are summed up), else 0."""
    from oiafed.sweep.runner import sweep
    from oiafed.sweep.summary import SUMMARY_MD

    if "=" in args.config:
        raise InputError(f"the first argument must be the config file, got {args.config!r}")
    jobs = args.jobs if args.jobs is not None else (1 if args.ray_address is None else 1 << 30)
    result = sweep(args.config, settings=args.settings, overrides=args.overrides,
                   seeds=args.seeds, sweep_dir=args.sweep_dir, jobs=jobs,
                   ray_address=args.ray_address, metric=args.metric, target=args.target,
                   higher_is_better=args.higher,
                   console=Console(stderr=True, quiet=True) if args.quiet else console)
    if not args.quiet:
        console.print(f"sweep folder: {escape(str(result.folder))}", highlight=False,
                      soft_wrap=True)
        summary = result.folder / SUMMARY_MD
        console.print(summary.read_text(encoding="utf-8"), markup=False, highlight=False,
                      soft_wrap=True)
    for cell, errors in result.failed.items():
        last = (errors.splitlines() or ["(no error output)"])[-1]
        console.print(f"[red]failed[/red] {escape(cell.folder)}: {escape(last)}",
                      highlight=False, soft_wrap=True)
    if result.failed:
        console.print(f"{len(result.failed)} cell(s) failed; run the "
                      "sweep again to retry them", highlight=False, soft_wrap=True)
        return 1
    return 0
