"""Running a sweep's cells: each one ``oiafed run`` in its own process (``--jobs`` at a time,
or as Ray tasks on a cluster), a finished cell skipped, an interrupted one resumed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from oiafed.exceptions import InputError, WorkerError
from oiafed.reporting.runs import read_summary, summary_status
from oiafed.run_folder import CONFIG, METRICS
from oiafed.sweep.grid import Cell, Plan

_TAIL = 2000
"""Characters of a failed cell's error output kept for the console."""
_PR_SET_PDEATHSIG = 1


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` ended by itself (completed, or stopped by a callback),
    as its ``summary.json`` says: a sweep started again skips it. (A cell's config cannot
    change, so a summary saying so is never that of an earlier session of a longer run.)"""
    return summary_status(read_summary(run_dir)) in ("completed", "stopped")


def cell_environment(jobs: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a cell's process: this one's, plus, when it sets no
    ``OMP_NUM_THREADS``, ``OMP_NUM_THREADS`` = the CPUs this process may use // ``jobs``
    (at least 1), so ``jobs`` cells at a time share the CPUs instead of each taking all."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // jobs))
    return env


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cell_arguments(sweep: Plan, cell: Cell) -> list[str]:
    """The ``oiafed`` arguments that run ``cell``: ``run CONFIG OVERRIDES --run-dir DIR`` for a
    new cell, ``--resume DIR`` (the config given too, so a changed one is refused) for one that
    was interrupted."""
    run_dir = sweep.cell_dir(cell)
    where = ["--resume" if (run_dir / CONFIG).exists() else "--run-dir", str(run_dir.resolve())]
    return ["run", str(sweep.config.resolve()), *sweep.cell_overrides(cell), *where, "-q"]


def end_with_parent(parent: int) -> None:
    """In a cell's process (Linux): be sent SIGTERM when the process that started it
    (``parent``) dies, so a killed sweep leaves no cell running on its own."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def run_oiafed(arguments: list[str], cwd: str) -> tuple[int, str]:
    """Run ``oiafed ARGUMENTS`` with this interpreter in ``cwd``; return its exit code and the
    end of its error output. (The body of a cell's Ray task.)"""
    with tempfile.TemporaryFile() as errors:
        process = _start(arguments, cwd, errors, None, ())
        try:
            code = process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
        return code, _tail(errors)


def _start(arguments: list[str], cwd: str, errors: IO[bytes], env: dict[str, str] | None,
           inherit: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """``oiafed ARGUMENTS`` (what ``python -m oiafed.cli`` runs) in a process that ends with
    this one, with ``env`` (None: this one's) and the file descriptors ``inherit`` open."""
    main = ("import sys; from oiafed.sweep.execute import end_with_parent; "
            f"end_with_parent({os.getpid()}); from oiafed.cli import main; sys.exit(main())")
    return subprocess.Popen([sys.executable, "-c", main, *arguments], cwd=cwd, env=env,
                            pass_fds=inherit, stdout=subprocess.DEVNULL, stderr=errors)


def _tail(errors: IO[bytes]) -> str:
    errors.seek(0)
    return errors.read().decode("utf-8", "replace")[-_TAIL:].strip()


@dataclass
class Outcome:
    """How a cell's process ended: its exit code and the end of its error output."""

    cell: Cell
    code: int
    errors: str


class Backend(Protocol):
    """Where cells run: ``start`` one, ``poll`` for those that ended, ``stop`` the rest."""

    def start(self, cell: Cell, arguments: list[str]) -> None: ...
    def poll(self, timeout: float) -> list[Outcome]: ...
    def stop(self) -> None: ...


class LocalProcesses:
    """Each cell an ``oiafed run`` process of this machine, with ``env`` (``cell_environment``)
    and the file descriptors ``inherit`` open: the sweep folder's lock, so that it stays taken
    until the last cell has ended, even one still stopping after the sweep was killed."""

    def __init__(self, cwd: str, env: dict[str, str], inherit: tuple[int, ...] = ()) -> None:
        self.cwd = cwd
        self.env = env
        self.inherit = inherit
        self._running: dict[Cell, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}

    def start(self, cell: Cell, arguments: list[str]) -> None:
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed by ``poll`` or ``stop``)
        self._running[cell] = (_start(arguments, self.cwd, errors, self.env, self.inherit),
                               errors)

    def poll(self, timeout: float) -> list[Outcome]:
        time.sleep(timeout)
        ended = []
        for cell, (process, errors) in list(self._running.items()):
            code = process.poll()
            if code is not None:
                ended.append(Outcome(cell, code, _tail(errors)))
                errors.close()
                del self._running[cell]
        return ended

    def stop(self) -> None:
        """Interrupt the cells still running (they save their state, as after Ctrl-C) and
        wait for them. Those that got the terminal's Ctrl-C too are given a second to end
        first: a second SIGINT could cut their state's save short."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(
                process.poll() is None for process, _ in self._running.values()):
            time.sleep(0.05)
        for process, _ in self._running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process, errors in self._running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            errors.close()
        self._running.clear()


class RayTasks:
    """Each cell an ``oiafed run`` process started by a Ray task (one CPU) of the cluster at
    ``address``; the sweep folder and the config must be at the same paths on every node."""

    def __init__(self, address: str, cwd: str) -> None:
        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install 'oiafed[ray]'") from None
        from oiafed.runtime.processes import ProcessSetup
        from oiafed.runtime.ray import probe

        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            probe(address, "--ray")
            # a cluster started here: its workers import what this process can import
            env = ({"env_vars": {"PYTHONPATH": ProcessSetup.here().pythonpath()}}
                   if address == "local" else None)
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env=env)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise WorkerError(f"cannot reach the Ray cluster at {address!r} (--ray): "
                                  f"{exc}") from exc
        self._task = ray.remote(num_cpus=1)(run_oiafed)
        self.cwd = cwd
        self._running: dict[Any, Cell] = {}

    def start(self, cell: Cell, arguments: list[str]) -> None:
        self._running[self._task.remote(arguments, self.cwd)] = cell

    def poll(self, timeout: float) -> list[Outcome]:
        if not self._running:
            return []
        done, _ = self._ray.wait(list(self._running), num_returns=len(self._running),
                                 timeout=timeout)
        ended = []
        for ref in done:
            cell = self._running.pop(ref)
            try:
                code, errors = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                code, errors = 1, f"the Ray task failed: {exc}"
            ended.append(Outcome(cell, code, errors))
        return ended

    def stop(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()
        if self._owned:
            self._ray.shutdown()
            self._owned = False


def run_cells(sweep: Plan, cells: list[Cell], backend: Backend, jobs: int,
              on_start: Callable[[Cell], None], on_end: Callable[[Outcome], None],
              on_tick: Callable[[], None]) -> None:
    """Run ``cells``, ``jobs`` at a time, on ``backend``; Ctrl-C stops those running (their
    state saved) and is raised again."""
    waiting = list(cells)
    running = 0
    with _stopping(backend):
        while waiting or running:
            while waiting and running < jobs:
                cell = waiting.pop(0)
                backend.start(cell, cell_arguments(sweep, cell))
                on_start(cell)
                running += 1
            for outcome in backend.poll(0.2):
                running -= 1
                on_end(outcome)
            on_tick()


@contextlib.contextmanager
def _stopping(backend: Backend) -> Iterator[None]:
    try:
        yield
    finally:
        backend.stop()


class RoundCounter:
    """The lines of a run's ``metrics.jsonl`` (its rounds done so far), counted as the file
    grows: each ``count`` reads only what was appended since the last (all of it again when
    the file was replaced, as a resumed run does)."""

    def __init__(self, run_dir: Path) -> None:
        self.file = run_dir / METRICS
        self._inode: int | None = None
        self._offset = 0
        self._lines = 0

    def count(self) -> int:
        try:
            with open(self.file, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._offset:
                    self._inode, self._offset, self._lines = stat.st_ino, 0, 0
                handle.seek(self._offset)
                added = handle.read()
        except OSError:
            return self._lines
        self._offset += len(added)
        self._lines += added.count(b"\n")
        return self._lines
