"""A whole gRPC deployment on this machine: a server on 127.0.0.1 and one ``oiafed client``
process per client of the federation (with a fresh random token), each logging to
``<run folder>/clients/<client id>.log``."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from oiafed.config import ExperimentConfig
from oiafed.exceptions import DeploymentError
from oiafed.runtime.grpc.auth import TOKEN_ENV, ServerSecurity
from oiafed.runtime.grpc.runtime import GrpcRuntime

LOOPBACK_MAX_CLIENTS = 128
"""A loopback deployment starts one process per client; more than this is a mistake."""
LOOPBACK_JOIN_TIMEOUT = 300.0
EXIT_TIMEOUT = 10.0


class LoopbackRuntime(GrpcRuntime):
    """A server on 127.0.0.1 and one ``oiafed client`` process per client of the federation."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__("127.0.0.1:0", ServerSecurity(token=secrets.token_urlsafe(32)),
                         min_join=cfg.runtime.min_join,
                         join_timeout=cfg.runtime.join_timeout or LOOPBACK_JOIN_TIMEOUT)
        self.cfg = cfg
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[IO[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def _listening(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="oiafed-grpc-")
        config_file = Path(self._tmp.name) / "config.yaml"
        config_file.write_text(self.cfg.to_yaml(), encoding="utf-8")
        run_dir = self.spec.run_dir
        log_dir = run_dir / "clients" if run_dir is not None else Path(self._tmp.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        # The children import what this process can (user modules of ``imports`` included).
        path = [p for p in sys.path if p and os.path.isdir(p)]
        token = self.security.token or ""
        env = {**os.environ, TOKEN_ENV: token,
               "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
        threads = str(self.cfg.runtime.threads or 1)
        for cid in self.spec.client_ids:
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
