"""The ``oiafed`` command: parse arguments, call run/validate/list. Exit 0 ok, 2 bad input, 1 failure."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler

from oiafed import registry
from oiafed.callbacks.progress import ProgressCallback, format_metrics
from oiafed.exceptions import InputError
from oiafed.run import run, validate

logger = logging.getLogger("oiafed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oiafed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run_cmd = commands.add_parser("run", help="run an experiment from a YAML config")
    run_cmd.add_argument("config", nargs="?", help="path of the YAML config (not needed with --resume)")
    run_cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides, e.g. trainer.args.rounds=5")
    run_cmd.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>-<time>)")
    run_cmd.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    run_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    validate_cmd = commands.add_parser("validate", help="check a config without running it")
    validate_cmd.add_argument("config")
    validate_cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    list_cmd = commands.add_parser("list", help="list registered components")
    list_cmd.add_argument("kind", nargs="?", choices=registry.KINDS)
    return parser


def _run(args: argparse.Namespace, console: Console) -> None:
    if args.config and "=" in args.config and not args.resume:
        raise InputError(f"the first argument must be the config file, got {args.config!r}")
    if args.config and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    extra = [] if args.quiet else [ProgressCallback(console)]
    result = run(args.config, run_dir=args.run_dir, resume=args.resume,
                 callbacks=extra, overrides=args.overrides)
    if args.quiet:
        return
    best = result.best()
    console.print(f"[bold]done[/bold]: {result.rounds_completed} rounds, {result.stop_reason}"
                  f"{f' (by {result.stopped_by})' if result.stopped_by else ''}, "
                  f"{result.wall_time:.1f}s")
    if best:
        console.print(f"best round {best['round']}: {format_metrics(best)}", highlight=False, soft_wrap=True)
    console.print(f"final: {format_metrics(result.final_metrics)}", highlight=False, soft_wrap=True)
    if result.callback_errors:
        console.print(f"[yellow]{len(result.callback_errors)} callback error(s); see the log")
    console.print(f"run folder: {result.run_dir}", highlight=False, soft_wrap=True)


def _validate(args: argparse.Namespace, console: Console) -> None:
    cfg = validate(args.config, args.overrides)
    console.print(f"{args.config}: valid ({cfg.name}, {cfg.data.num_clients} clients, "
                  f"{len(cfg.callbacks)} callbacks)", highlight=False, soft_wrap=True)


def _list(args: argparse.Namespace, console: Console) -> None:
    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for kind in kinds:
        names = [n.split(".", 1)[1] for n in registry.names(kind)]
        console.print(f"[bold]{kind}[/bold]: {', '.join(names) or '(none)'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oiafed`` command; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and args.command == "list"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    console = Console(stderr=True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    handlers = {"run": _run, "validate": _validate, "list": _list}
    try:
        handlers[args.command](args, Console())
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    except Exception as exc:
        logger.exception("oiafed %s failed", args.command)
        console.print(f"[red]failed:[/red] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
