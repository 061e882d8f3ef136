"""``runtime.mode: grpc``: a real deployment, a server process and client processes.

* ``runtime.address`` set (what ``oiafed server --address HOST:PORT`` does): this process is the
  server; it listens there and waits for clients started elsewhere with ``oiafed client``.
* ``runtime.address`` unset: a whole deployment on this machine: the server listens on a free
  port of 127.0.0.1 and starts one ``oiafed client`` process per client (with a fresh random
  token), logging each to ``<run folder>/clients/<client id>.log``.

The server waits for ``runtime.min_join`` clients (default: all) before the first round, for at
most ``runtime.join_timeout`` seconds (default: no limit; 300 on loopback). The token and TLS
material of a server come from ``use_security`` (the ``oiafed server`` flags), else the token
from ``$OIAFED_TOKEN``; a server without a token refuses to start unless told ``--no-token``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import IO

from oiafed.config import ExperimentConfig
from oiafed.exceptions import ConfigError
from oiafed.runtime.grpc.auth import TOKEN_ENV, ClientSecurity, ServerSecurity
from oiafed.runtime.grpc.server import DeploymentError, GrpcRuntime
from oiafed.runtime.worker import ClientWorker

__all__ = ["ClientSecurity", "DeploymentError", "GrpcRuntime", "LoopbackRuntime",
           "ServerSecurity", "create", "use_security"]

LOOPBACK_MAX_CLIENTS = 128
"""A loopback deployment starts one process per client; more than this is a mistake."""

LOOPBACK_JOIN_TIMEOUT = 300.0
EXIT_TIMEOUT = 10.0

_SECURITY: ContextVar[ServerSecurity | None] = ContextVar("oiafed_grpc_security", default=None)


@contextlib.contextmanager
def use_security(security: ServerSecurity) -> Iterator[None]:
    """Servers created inside this block (``oiafed.run`` with ``runtime.address``) use
    ``security`` (token, TLS) instead of ``$OIAFED_TOKEN`` alone."""
    token = _SECURITY.set(security)
    try:
        yield
    finally:
        _SECURITY.reset(token)


def create(cfg: ExperimentConfig, worker: ClientWorker) -> GrpcRuntime:
    """The server runtime (``runtime.address`` set) or a loopback deployment (unset).

    Raises:
        ConfigError: on ``runtime.min_join`` above the number of clients, or a loopback
            deployment of more than ``LOOPBACK_MAX_CLIENTS`` clients.
        InputError: when a server has no token and was not told to run without one.
    """
    runtime, num_clients = cfg.runtime, cfg.data.num_clients
    if runtime.min_join is not None and runtime.min_join > num_clients:
        raise ConfigError(f"{runtime.min_join} is more than the {num_clients} clients of the "
                          "federation", "runtime.min_join")
    if runtime.address:
        security = _SECURITY.get() or ServerSecurity.from_options()
        return GrpcRuntime(worker, runtime.address, security, min_join=runtime.min_join,
                           join_timeout=runtime.join_timeout)
    if num_clients > LOOPBACK_MAX_CLIENTS:
        raise ConfigError(
            f"a loopback gRPC deployment starts one process per client; {num_clients} clients "
            f"is more than {LOOPBACK_MAX_CLIENTS}: use runtime.mode parallel or ray, or set "
            "runtime.address and start the clients yourself", "runtime.mode")
    return LoopbackRuntime(cfg, worker)


class LoopbackRuntime(GrpcRuntime):
    """A server on 127.0.0.1 and one ``oiafed client`` process per client of the federation."""

    def __init__(self, cfg: ExperimentConfig, worker: ClientWorker) -> None:
        super().__init__(worker, "127.0.0.1:0", ServerSecurity(token=secrets.token_urlsafe(32)),
                         min_join=cfg.runtime.min_join,
                         join_timeout=cfg.runtime.join_timeout or LOOPBACK_JOIN_TIMEOUT)
        self.cfg = cfg
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[IO[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def _listen(self) -> None:
        await super()._listen()
        self._start_clients()

    def _start_clients(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="oiafed-grpc-")
        config_file = Path(self._tmp.name) / "config.yaml"
        config_file.write_text(self.cfg.to_yaml(), encoding="utf-8")
        run_dir = getattr(self.trainer, "run_dir", None)
        log_dir = Path(run_dir) / "clients" if run_dir is not None else Path(self._tmp.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        # The children import what this process can (user modules of ``imports`` included).
        path = [p for p in sys.path if p and os.path.isdir(p)]
        env = {**os.environ, TOKEN_ENV: self.security.token,
               "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
        threads = str(self.cfg.runtime.threads or 1)
        for cid in self.trainer.client_ids:
            log = log_dir / f"{cid}.log"
            handle = open(log, "ab")  # noqa: SIM115 - closed in _shutdown
            self._files.append(handle)
            self.logs[cid] = log
            self.processes[cid] = subprocess.Popen(
                [sys.executable, "-m", "oiafed.cli", "client", str(config_file),
                 "--server", f"127.0.0.1:{self.port}", "--client-id", cid, "--threads", threads,
                 "--reconnect-timeout", "30"],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env,
            )

    def _check_clients(self) -> None:
        for cid, process in self.processes.items():
            if process.poll() is not None and cid not in self.sessions:
                raise DeploymentError(
                    f"the process of {cid} exited with code {process.returncode} before it "
                    f"joined; the end of {self.logs[cid]}:\n{self._tail(cid)}")

    def _tail(self, cid: str, lines: int = 15) -> str:
        try:
            text = self.logs[cid].read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def _shutdown(self, *, ok: bool, reason: str) -> None:
        try:
            await super()._shutdown(ok=ok, reason=reason)
        finally:
            self._stop_clients()

    def _stop_clients(self) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for handle in self._files:
            handle.close()
        self._files.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
