"""A whole gRPC deployment on this machine: a server on 127.0.0.1 and one ``oiafed client``
process per client of the federation (each with its own token, derived from a fresh random
secret), each logging to
``<run folder>/clients/<client id>.log``. The client processes are forked from the runtimes'
forkserver (``runtime/processes.py``: the imports are paid once), or started as
``python -m oiafed.cli client`` where the OS has none."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import IO, Any, Protocol

from oiafed.config import ExperimentConfig
from oiafed.device import learner_device_name, worker_device
from oiafed.exceptions import DeploymentError
from oiafed.runtime import processes
from oiafed.runtime.grpc.auth import TOKEN_ENV, ServerSecurity, client_token
from oiafed.runtime.grpc.runtime import GrpcRuntime
from oiafed.runtime.processes import ProcessSetup

LOOPBACK_MAX_CLIENTS = 128
"""A loopback deployment starts one process per client; more than this is a mistake."""
LOOPBACK_JOIN_TIMEOUT = 300.0
EXIT_TIMEOUT = 10.0


def _client_main(argv: list[str], log: str, token: str, setup: ProcessSetup) -> None:
    """A forked ``oiafed client``: stdin from /dev/null, stdout and stderr to ``log``."""
    for fd, (path, flags) in enumerate([(os.devnull, os.O_RDONLY),
                                        (log, os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                                        (log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)]):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    setup.apply()
    os.environ[TOKEN_ENV] = token
    from oiafed.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class ClientProcess(Protocol):
    """What the loopback runtime needs of a client process (``subprocess.Popen`` has it)."""

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class ForkedClient:
    """An ``oiafed client`` forked from the forkserver, seen as a ``ClientProcess``."""

    def __init__(self, ctx: BaseContext, argv: list[str], log: Path, token: str) -> None:
        self.process: Any = ctx.Process(  # type: ignore[attr-defined]
            target=_client_main, args=(argv, str(log), token, ProcessSetup.here()),
            name=f"oiafed-client-{argv[argv.index('--client-id') + 1]}")
        self.process.start()

    @property
    def returncode(self) -> int | None:
        code: int | None = self.process.exitcode
        return code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        code = self.returncode
        if code is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout or 0.0)
        return code

    def kill(self) -> None:
        self.process.kill()


class LoopbackRuntime(GrpcRuntime):
    """A server on 127.0.0.1 and one ``oiafed client`` process per client of the federation."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        secret = secrets.token_urlsafe(32)
        super().__init__("127.0.0.1:0", ServerSecurity(secret),
                         min_join=cfg.runtime.min_join,
                         join_timeout=cfg.runtime.join_timeout or LOOPBACK_JOIN_TIMEOUT,
                         hello_timeout=cfg.runtime.hello_timeout,
                         max_streams=cfg.runtime.max_streams)
        self.cfg = cfg
        self._secret = secret
        self.processes: dict[str, ClientProcess] = {}
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
        env = {**os.environ, "PYTHONPATH": ProcessSetup.here().pythonpath()}
        threads = str(self.cfg.runtime.threads or 1)
        ctx = processes.context()
        learners = learner_device_name(self.cfg)
        for index, cid in enumerate(self.spec.client_ids):
            log = log_dir / f"{cid}.log"
            self.logs[cid] = log
            # client i trains on GPU i % (visible GPUs), as the parallel runtime's workers
            argv = ["client", str(config_file), "--server", f"127.0.0.1:{self.port}",
                    "--client-id", cid, "--threads", threads, "--reconnect-timeout", "30",
                    "--device", worker_device(learners, index)]
            token = client_token(self._secret, cid)
            if ctx.get_start_method() == "forkserver":
                self.processes[cid] = ForkedClient(ctx, argv, log, token)
                continue
            handle = open(log, "ab")  # noqa: SIM115 - closed in _shutdown
            self._files.append(handle)
            self.processes[cid] = subprocess.Popen(
                [sys.executable, "-m", "oiafed.cli", *argv],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                env={**env, TOKEN_ENV: token},
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
