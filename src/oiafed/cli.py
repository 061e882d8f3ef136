"""The ``oiafed`` command: run, validate, list; sweep a grid; report and compare runs; server,
client and tokens of a deployment. Exit 0 ok, 2 bad input, 1 failure."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

import oiafed
from oiafed import registry
from oiafed.callbacks.progress import ProgressCallback, format_metrics
from oiafed.config import load_config
from oiafed.core.types import TrainResult
from oiafed.exceptions import InputError, OiafedError, exit_code
from oiafed.reporting.command import add_report_commands, compare_command, report_command
from oiafed.run import run, validate
from oiafed.run_folder import REPORT_HTML, RUN_LOG, active_run_log
from oiafed.sweep.command import add_sweep_command, sweep_command

logger = logging.getLogger("oiafed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oiafed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"oiafed {oiafed.__version__}")
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

    list_cmd = commands.add_parser(
        "list", help="list registered components; with KIND NAME, one component's arguments")
    list_cmd.add_argument("kind", nargs="?", metavar="KIND",
                          choices=[*registry.KINDS, *(kind + "s" for kind in registry.KINDS)],
                          help=f"one of {', '.join(registry.KINDS)} (plurals accepted)")
    list_cmd.add_argument("name", nargs="?", metavar="NAME",
                          help="a component: its arguments (type = default) and docstring")

    server_cmd = commands.add_parser(
        "server", help="serve a deployment: train with the clients that join over gRPC",
        description="Run the trainer of CONFIG as a gRPC server; wait for the clients "
                    "(oiafed client) to join, train, tell them to finish. Each client presents "
                    "its own token, derived from the secret in $OIAFED_SECRET or --secret-file "
                    "(oiafed token prints it).")
    server_cmd.add_argument("config", nargs="?", help="path of the YAML config (not needed with --resume)")
    server_cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    server_cmd.add_argument("--address", required=True, metavar="HOST:PORT",
                            help="where to listen, e.g. 0.0.0.0:50051")
    server_cmd.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>-<time>)")
    server_cmd.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    server_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _security_flags(server_cmd, "--secret-file",
                    "file holding the secret that clients' tokens derive from (default: "
                    "$OIAFED_SECRET; at least 32 characters)")
    server_cmd.add_argument("--tls-cert", metavar="PEM", help="the server's certificate chain")
    server_cmd.add_argument("--tls-key", metavar="PEM", help="the server's private key")
    server_cmd.add_argument("--tls-client-ca", metavar="PEM",
                            help="CA of client certificates: require them (mutual TLS)")

    client_cmd = commands.add_parser(
        "client", help="join a deployment's server and train when asked",
        description="Join the gRPC server of a deployment as one client: train its partition "
                    "of CONFIG's data (or, with --local-data, the whole configured dataset) when "
                    "asked; reconnect after a dropped connection; exit when the run is over.")
    client_cmd.add_argument("config", help="path of the YAML config (the server's)")
    client_cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    client_cmd.add_argument("--server", required=True, metavar="HOST:PORT", help="the server")
    client_cmd.add_argument("--client-id", required=True, metavar="ID", help="e.g. client_3")
    _security_flags(client_cmd, "--token-file",
                    "file holding this client's own token (default: $OIAFED_TOKEN)")
    client_cmd.add_argument("--tls-ca", metavar="PEM", help="CA of the server's certificate (turns TLS on)")
    client_cmd.add_argument("--tls-cert", metavar="PEM", help="this client's certificate (mutual TLS)")
    client_cmd.add_argument("--tls-key", metavar="PEM", help="this client's private key (mutual TLS)")
    client_cmd.add_argument("--tls-server-name", metavar="NAME",
                            help="name in the server's certificate, if not the host dialled")
    client_cmd.add_argument("--local-data", action="store_true",
                            help="train on the whole configured dataset (a local one) instead of "
                                 "the partition computed from the seed")
    client_cmd.add_argument("--threads", type=int, metavar="N", help="torch threads")
    client_cmd.add_argument("--device", metavar="DEVICE",
                            help="this client's device: auto, cpu, cuda, cuda:N or mps "
                                 "(sets runtime.device; default: the config's)")
    client_cmd.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="SECONDS",
                            help="give up after this long without reaching the server (default 300)")

    token_cmd = commands.add_parser(
        "token", help="print clients' own tokens, derived from the server's secret",
        description="Print the token of each CLIENT_ID, one a line in the order given, derived "
                    "from the server's secret ($OIAFED_SECRET or --secret-file); hand each client "
                    "its own (its $OIAFED_TOKEN or --token-file).")
    token_cmd.add_argument("client_ids", nargs="+", metavar="CLIENT_ID", help="e.g. client_3")
    token_cmd.add_argument("--secret-file", metavar="FILE",
                           help="file holding the server's secret (default: $OIAFED_SECRET)")
    add_sweep_command(commands)
    add_report_commands(commands)
    return parser


def _security_flags(command: argparse.ArgumentParser, file_flag: str, file_help: str) -> None:
    command.add_argument(file_flag, metavar="FILE", help=file_help)
    command.add_argument("--no-token", action="store_true",
                         help="no token (anyone who reaches the server joins as any client, or with "
                              "mutual TLS as the id its certificate names): trusted networks only")


def _run(args: argparse.Namespace, console: Console) -> None:
    if args.config and "=" in args.config and not args.resume:
        raise InputError(f"the first argument must be the config file, got {args.config!r}")
    if args.config and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    extra = [] if args.quiet else [ProgressCallback(console)]
    before = _report_stamp(args.resume or args.run_dir)
    result = run(args.config, run_dir=args.run_dir, resume=args.resume,
                 callbacks=extra, overrides=args.overrides)
    if not args.quiet:
        _report(result, console, before)


def _report_stamp(run_dir: str | None) -> tuple[int, int] | None:
    """Inode and modification time of ``run_dir``'s report.html (None: there is none)."""
    try:
        stat = (Path(run_dir) / REPORT_HTML).stat() if run_dir else None
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return None if stat is None else (stat.st_ino, stat.st_mtime_ns)


def _report(result: TrainResult, console: Console, before: tuple[int, int] | None) -> None:
    """What a finished run prints: its outcome, best and final metrics, folder and report
    (when the run wrote one: ``before`` is the stamp of any report.html it started with)."""
    best = result.best()
    console.print(f"[bold]done[/bold]: {result.rounds_completed} rounds, {result.stop_reason}"
                  f"{f' (by {result.stopped_by})' if result.stopped_by else ''}, "
                  f"{result.wall_time:.1f}s")
    if best:
        console.print(f"best round {best['round']}: {format_metrics(best)}", highlight=False, soft_wrap=True)
    console.print(f"final: {format_metrics(result.final_metrics)}", highlight=False, soft_wrap=True)
    if result.callback_errors:
        console.print(f"[yellow]{len(result.callback_errors)} callback error(s)[/yellow]; "
                      f"tracebacks in {result.run_dir and result.run_dir / RUN_LOG}",
                      highlight=False, soft_wrap=True)
    console.print(f"run folder: {result.run_dir}", highlight=False, soft_wrap=True)
    if result.run_dir is not None:
        stamp = _report_stamp(str(result.run_dir))
        if stamp is not None and stamp != before:  # written anew (atomically: a new inode)
            console.print(f"report: {result.run_dir / REPORT_HTML}", highlight=False,
                          soft_wrap=True)


def _server(args: argparse.Namespace, console: Console) -> None:
    from oiafed.runtime.grpc import ServerSecurity, use_security
    from oiafed.runtime.grpc.wire import parse_address

    if args.config and "=" in args.config:
        if not args.resume:
            raise InputError(f"the first argument must be the config file, got {args.config!r}")
        args.overrides, args.config = [args.config, *args.overrides], None
    parse_address(args.address, "--address")
    security = ServerSecurity.from_options(
        secret_file=args.secret_file, no_token=args.no_token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)
    # JSON strings are YAML strings: an address like [::]:50051 stays a string.
    overrides = [*args.overrides, "runtime.mode=grpc", f"runtime.address={json.dumps(args.address)}"]
    logging.getLogger("oiafed.runtime.grpc").setLevel(logging.INFO)
    extra = [] if args.quiet else [ProgressCallback(console)]
    before = _report_stamp(args.resume or args.run_dir)
    with use_security(security):
        result = run(args.config, run_dir=args.run_dir, resume=args.resume, callbacks=extra,
                     overrides=overrides)
    if not args.quiet:
        _report(result, console, before)


def _client(args: argparse.Namespace, console: Console) -> int:
    from oiafed.runtime.grpc import ClientSecurity
    from oiafed.runtime.grpc.client import ServerUnreachable, run_client
    from oiafed.runtime.grpc.wire import parse_address

    parse_address(args.server, "--server")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.reconnect_timeout <= 0:
        raise InputError(f"--reconnect-timeout must be > 0, got {args.reconnect_timeout}")
    security = ClientSecurity.from_options(
        token_file=args.token_file, no_token=args.no_token, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name)
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"runtime.device={json.dumps(args.device)}")
    cfg = load_config(args.config, overrides)
    logging.getLogger("oiafed.runtime.grpc").setLevel(logging.INFO)
    try:
        finished = run_client(cfg, server=args.server, client_id=args.client_id, security=security,
                              local_data=args.local_data, threads=args.threads,
                              reconnect_timeout=args.reconnect_timeout)
    except ServerUnreachable as exc:
        console.print(f"failed: {exc}", highlight=False, soft_wrap=True)
        return 1
    console.print(f"{args.client_id}: the server ended the run: {finished.reason}",
                  highlight=False, soft_wrap=True)
    return 0 if finished.ok else 1


def _token(args: argparse.Namespace, console: Console) -> None:
    from oiafed.runtime.grpc.auth import ServerSecurity, client_token

    secret = ServerSecurity.from_options(secret_file=args.secret_file).secret
    assert secret is not None  # required: from_options raises without one
    for client_id in args.client_ids:
        console.print(client_token(secret, client_id), markup=False, highlight=False,
                      soft_wrap=True)


def _validate(args: argparse.Namespace, console: Console) -> None:
    cfg = validate(args.config, args.overrides)
    console.print(f"{args.config}: valid ({cfg.name}, {cfg.data.num_clients} clients, "
                  f"{len(cfg.callbacks)} callbacks)", highlight=False, soft_wrap=True)


def _list(args: argparse.Namespace, console: Console) -> None:
    kind = args.kind.removesuffix("s") if args.kind else None
    if kind and args.name:
        _describe(kind, args.name, console)
        return
    kinds = [kind] if kind else list(registry.KINDS)
    for kind in kinds:
        names = [n.split(".", 1)[1] for n in registry.names(kind)]
        console.print(f"[bold]{kind}[/bold]: {', '.join(names) or '(none)'}")


def _describe(kind: str, name: str, console: Console) -> None:
    """``oiafed list KIND NAME``: the docstring's first line, then each argument."""
    from oiafed.config import INJECTED_ARGS

    info = registry.describe(kind, name, INJECTED_ARGS.get(kind, set()))
    lines = [f"{kind} {info.name.split('.', 1)[1]}: {info.summary or '(no docstring)'}"]
    lines += [f"  {arg.name}: {arg.type}" + (" (required)" if arg.default is None
                                             else f" = {arg.default}") for arg in info.arguments]
    if not info.arguments:
        lines.append("  (no arguments)")
    if info.any_other:
        lines.append("  ...and any other keyword argument")
    if info.injected:
        lines.append(f"  set by oiafed: {', '.join(info.injected)}")
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def _console_handler(console: Console) -> logging.Handler:
    """Log records on stderr: rich on a terminal, else plain lines of any width (nothing
    wraps at 80 columns); while a run writes its run.log, one line per record."""
    if console.is_terminal:
        return _RichOneLine(console=console, show_path=False)
    handler = _PlainOneLine(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return handler


def _one_line(record: logging.LogRecord) -> logging.LogRecord:
    """``record`` as one line pointing at run.log, where its traceback (or the rest of its
    text) is, while a run writes one; else ``record`` itself."""
    log_file = active_run_log()
    if log_file is None or not (record.exc_info or "\n" in record.getMessage()):
        return record
    lines = record.getMessage().splitlines() or [""]
    text = lines[0]
    error = record.exc_info[1] if record.exc_info else None
    if error is not None:
        text += f": {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    short = logging.makeLogRecord(record.__dict__)
    short.msg, short.args = f"{text} (details in {log_file})", None
    short.exc_info, short.exc_text, short.stack_info = None, None, None
    return short


class _RichOneLine(RichHandler):
    def emit(self, record: logging.LogRecord) -> None:
        super().emit(_one_line(record))


class _PlainOneLine(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        super().emit(_one_line(record))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oiafed`` command; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "list" and args.name and "=" in args.name:  # not a name: an override
        extra = [args.name, *extra]
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and args.command in ("list", "token", "report", "compare")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Registered first, so it runs last: the final garbage collection of torch's many objects
    # (~0.35 s) is skipped at exit; the OS frees the memory anyway.
    atexit.register(gc.freeze)
    console = Console(stderr=True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[_console_handler(console)],
    )
    handlers: dict[str, Any] = {"run": _run, "validate": _validate, "list": _list,
                                "server": _server, "client": _client, "token": _token,
                                "sweep": sweep_command, "report": report_command,
                                "compare": compare_command}
    try:
        code = handlers[args.command](args, Console())
    except BaseException as exc:  # every way out is mapped by exceptions.exit_code
        if not isinstance(exc, Exception | KeyboardInterrupt):
            raise
        _explain(exc, args.command, console)
        return exit_code(exc)
    return code or 0


def _explain(exc: BaseException, command: str, console: Console) -> None:
    """One line saying why ``command`` ended (a traceback only for an unexpected error)."""
    if isinstance(exc, KeyboardInterrupt):
        console.print("[red]interrupted[/red]")
    elif isinstance(exc, InputError):
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    else:
        if not isinstance(exc, OiafedError):
            logger.error("oiafed %s failed", command, exc_info=exc)
        console.print(f"[red]failed:[/red] {type(exc).__name__}: {escape(str(exc))}",
                      highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
