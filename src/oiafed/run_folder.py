"""The run folder: resolved config, per-round metrics, partition report and summary."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from oiafed.config import ExperimentConfig, RuntimeConfig, fill_defaults
from oiafed.core.types import TrainResult
from oiafed.exceptions import InputError
from oiafed.io import atomic_write_json, atomic_write_text
from oiafed.jsonl import iter_jsonl, read_jsonl
from oiafed.state import STATE_FILE, Snapshot, StateWriter, take_snapshot

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PARTITION = "partition.json"
CLIENTS = "clients.jsonl"
CLIENT_STATES = "client_state"
"""The folder of the algorithm's per-client state versions (``core.client_states``)."""
RUN_LOG = "run.log"
REPORT_HTML = "report.html"
"""The run's report page (``oiafed report``, ``report: true``)."""
PLOTS_DIR = "report"
"""The folder, inside the run folder, of the report's PNG files."""
_ROUND_PREFIX = re.compile(rb'\{"round": (\d+)[,}]')
logger = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
    """A value ``json`` cannot write as itself: a NumPy or torch scalar's number, else text."""
    return value.item() if hasattr(value, "item") else str(value)


_ROWS = json.JSONEncoder(default=_json_default)


class RunLog(logging.FileHandler):
    """``run.log``: what the ``oiafed`` logger says during a run (warnings, errors, their
    tracebacks), plain text, full width; attached for the run's duration."""

    def __init__(self, file: Path) -> None:
        super().__init__(file, encoding="utf-8")
        self.setLevel(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        handled = super().handle(record)
        # Logging's last resort (warnings on stderr when no handler is configured, as in a
        # plain script or notebook) is skipped once any handler exists: this one must not
        # silence the console, so it calls the last resort where logging would have.
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and not self._others(record):
            last.handle(record)
        return handled

    def write(self, record: logging.LogRecord) -> None:
        """Write ``record`` to the file only."""
        super().handle(record)

    def _others(self, record: logging.LogRecord) -> bool:
        """Whether a handler besides this one sees ``record`` (what ``Logger.callHandlers``
        counts before it falls back on the last resort)."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False


def active_run_log() -> Path | None:
    """The ``run.log`` of the run going on in this process, if any (the console can then
    show one line per error and leave the traceback to the file)."""
    for handler in logging.getLogger("oiafed").handlers:
        if isinstance(handler, RunLog):
            return Path(handler.baseFilename)
    return None


class RunFolder:
    """One run's folder. After each round ``record_round`` appends a line to ``metrics.jsonl``
    and snapshots the resumable state every ``checkpoint_every`` rounds; the snapshot is
    written (``state.safetensors``) at most once per ``checkpoint_interval`` seconds (counted
    from the folder's opening; the first, the last and a stopping round always). A run that
    fails writes the last snapshot kept (``save_pending``), so the state on disk is always
    that of the last completed round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoint_every = 1  # until ``use_policy``
        self.checkpoint_interval = 0.0
        self.device: dict[str, Any] | None = None  # summary.json's "device" (``device.record``)
        self._saved_round: int | None = None
        self.durable_round: int | None = None
        """The last round whose state is known to be on disk (None: none yet)."""
        self._saved_at = time.monotonic()
        self._pending: tuple[int, Snapshot] | None = None
        self._state_writer = StateWriter(path)
        self._metrics: IO[str] | None = None
        self._clients: IO[str] | None = None
        self._log: RunLog | None = None
        self.new = False  # made by ``create`` for a new run (not a resumed one)
        self._made_dir = False  # the folder did not exist before (``discard`` removes it)
        self.at_end: list[Callable[[Path], object]] = []
        """Called with the folder once the run has ended and ``summary.json`` is written
        (``run_at_end``): the report of ``report: true`` or the ``report`` callback."""

    @classmethod
    def open(cls, run_dir: str | Path) -> RunFolder:
        """An existing run folder, to resume (an ``InputError`` if it is not one, or cannot be
        written to: nothing is left in it by the check); call ``use_policy`` with its config's
        runtime section."""
        path = Path(run_dir)
        if not (path / CONFIG).is_file():
            raise InputError(f"cannot resume: {path} is not a run folder (no {CONFIG})")
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise InputError(f"cannot resume: cannot write the run folder {path}: "
                             f"{exc.strerror or exc}") from None
        return cls(path.resolve())

    def use_policy(self, runtime: RuntimeConfig) -> None:
        """Save the state as ``runtime.checkpoint_every`` / ``checkpoint_interval`` say."""
        self.checkpoint_every = runtime.checkpoint_every
        self.checkpoint_interval = runtime.checkpoint_interval

    @classmethod
    def create(cls, run_dir: str | Path | None, cfg: ExperimentConfig) -> RunFolder:
        """Make ``run_dir`` (default ``<output_dir>/<name>-<timestamp>``) for a new run.

        Raises:
            InputError: if the folder already holds a run (nothing in it is touched), or
                cannot be made or written to.
        """
        if run_dir is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        else:
            path = Path(run_dir)
            if any((path / name).exists() for name in (METRICS, CONFIG, STATE_FILE)):
                raise InputError(f"{path} already holds a run; choose another --run-dir")
        made = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / RUN_LOG).touch()  # the folder can be written to
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            where = "--run-dir" if run_dir is not None else "output_dir"
            raise InputError(f"cannot write the run folder {path} ({where}): "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        folder = cls(path.resolve())
        folder.new, folder._made_dir = True, made
        folder.use_policy(cfg.runtime)
        return folder

    def start_log(self) -> None:
        """Write what the ``oiafed`` logger says to ``run.log`` (appended) until ``close``."""
        if self._log is None:
            self._log = RunLog(self.path / RUN_LOG)
            logging.getLogger("oiafed").addHandler(self._log)

    def log_failure(self, exc: BaseException, reason: str) -> None:
        """Write why the run ended to ``run.log`` only (the console has its own line),
        with the traceback of an error."""
        if self._log is None:
            return
        interrupted = isinstance(exc, KeyboardInterrupt) or reason == "interrupted"
        record = logging.LogRecord(
            "oiafed.run", logging.WARNING if interrupted else logging.ERROR, __file__, 0,
            "the run ended: %s", (reason,), None if interrupted else (type(exc), exc, exc.__traceback__))
        self._log.write(record)

    def discard(self) -> bool:
        """Remove what a run that failed before its first round wrote, so that the folder does
        not block another run: its files, and the folder if this run made it. Nothing is
        removed when the folder holds anything else (then it returns False)."""
        ours = {CONFIG, PARTITION, METRICS, CLIENTS, RUN_LOG, SUMMARY}
        entries = list(self.path.iterdir())
        if any(entry.name not in ours or not entry.is_file() for entry in entries):
            return False
        for entry in entries:
            entry.unlink(missing_ok=True)
        if self._made_dir:
            self.path.rmdir()
        return True

    def write_config(self, cfg: ExperimentConfig) -> None:
        """``config.yaml``: ``cfg`` with every component argument's value, defaults included."""
        atomic_write_text(self.path / CONFIG, fill_defaults(cfg).to_yaml())

    def write_partition(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.path / PARTITION, report)

    def record_clients(self, rows: list[dict[str, Any]]) -> None:
        """Append a round's client rows to ``clients.jsonl`` (buffered: ``record_round``
        flushes them with the round's row)."""
        if self._clients is None:
            self._clients = open(self.path / CLIENTS, "a", encoding="utf-8")  # noqa: SIM115
        encode = _ROWS.encode  # one encoder (json.dumps with default= makes one a call)
        self._clients.write("".join(encode(row) + "\n" for row in rows))

    def record_round(self, trainer: Any, row: dict[str, Any]) -> None:
        if self._metrics is None:
            self._metrics = open(self.path / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(_ROWS.encode(row) + "\n")
        self._metrics.flush()  # in the OS's hands: a killed process loses no finished round
        if self._clients is not None:
            self._clients.flush()
        round_num = row["round"]
        self._collect_client_states(trainer, round_num)
        if not self.checkpoint_every or round_num % self.checkpoint_every:
            return
        snapshot = take_snapshot(trainer.state_dict(include_history=False))
        if (self._saved_round is None or round_num >= trainer.rounds or trainer.should_stop
                or time.monotonic() - self._saved_at >= self.checkpoint_interval):
            self._write(round_num, snapshot)
        else:
            self._pending = (round_num, snapshot)

    def save_state(self, trainer: Any) -> None:
        """Snapshot the resumable state of ``trainer``; it reaches disk atomically, in the
        background (``close`` waits for it)."""
        if self.checkpoint_every:
            self._write(trainer.round_num, take_snapshot(trainer.state_dict(include_history=False)))

    def save_state_now(self, trainer: Any) -> None:
        """Write the resumable state of ``trainer`` whatever the checkpoint policy, and wait
        until it is on disk (a resume keeping what it counted before it drops rows).

        Raises:
            InputError: when the state file cannot be written (nothing else has changed).
        """
        self._write(trainer.round_num, take_snapshot(trainer.state_dict(include_history=False)))
        try:
            self._state_writer.wait()
        except OSError as exc:
            raise InputError(f"cannot resume: cannot write the state file in {self.path}: "
                             f"{exc.strerror or exc}") from None

    def save_pending(self) -> None:
        """Write the last snapshot kept back by ``checkpoint_interval``, if any."""
        if self._pending is not None:
            self._write(*self._pending)

    def has_state(self) -> bool:
        """Whether a state file is (or is being) written."""
        return self._saved_round is not None or (self.path / STATE_FILE).exists()

    def _collect_client_states(self, trainer: Any, round_num: int) -> None:
        """Delete the server half's per-client state versions no resume can need."""
        states = getattr(trainer, "client_states", None)
        if states is None:
            return
        if not self.checkpoint_every:
            states.collect(round_num)
        elif self.durable_round is not None:
            states.collect(self.durable_round)

    def collect_client_states(self, trainer: Any) -> None:
        """After ``close``: keep only the per-client state versions the saved state needs."""
        states = getattr(trainer, "client_states", None)
        if states is not None and self._saved_round is not None:
            self.durable_round = self._saved_round
            states.collect(self._saved_round)

    def _write(self, round_num: int, snapshot: Snapshot) -> None:
        previous = self._saved_round
        self._state_writer.submit_snapshot(snapshot)  # after the write in flight is done
        if previous is not None:
            self.durable_round = previous
        self._saved_round = round_num
        self._saved_at = time.monotonic()
        self._pending = None

    def close(self) -> None:
        """Close ``metrics.jsonl``, ``clients.jsonl`` and ``run.log``, and wait until the last
        state snapshot is on disk."""
        for file in (self._metrics, self._clients):
            if file is not None:
                file.close()
        self._metrics = self._clients = None
        if self._log is not None:
            logging.getLogger("oiafed").removeHandler(self._log)
            self._log.close()
            self._log = None
        self._state_writer.close()

    def saved_round(self, round_num: int) -> bool:
        """Whether the state after ``round_num`` is already on disk."""
        return self._saved_round == round_num

    def history_until(self, round_num: int) -> list[dict[str, Any]]:
        """The history of rounds 1..``round_num`` from ``metrics.jsonl`` (nothing is written:
        ``keep_rounds`` drops the later rows).

        Raises:
            InputError: when the file lacks one of those rounds.
        """
        rows = [row for row in self.read_metrics() if row.get("round", 0) <= round_num]
        if len(rows) != round_num or any(row.get("round") != i
                                         for i, row in enumerate(rows, start=1)):
            raise InputError(f"cannot resume: {self.path / METRICS} does not hold rounds "
                             f"1..{round_num} once each, as the saved state needs")
        return rows

    def keep_rounds(self, round_num: int, history: list[dict[str, Any]]) -> None:
        """Drop the rows of rounds after ``round_num`` (which a resumed run redoes):
        ``metrics.jsonl`` becomes ``history`` (``history_until(round_num)``), and
        ``clients.jsonl`` is cut after that round."""
        atomic_write_text(self.path / METRICS, "".join(json.dumps(row) + "\n" for row in history))
        self._trim_clients(round_num)

    def _trim_clients(self, round_num: int) -> None:
        """Cut ``clients.jsonl`` after its rows of rounds 1..``round_num`` (rows are in round
        order; a last line cut short by a kill goes too)."""
        file = self.path / CLIENTS
        if not file.exists():
            return
        keep = 0
        with open(file, "rb") as handle:
            for line in handle:
                match = _ROUND_PREFIX.match(line)
                if not line.endswith(b"\n") or (int(match.group(1)) if match else
                                                 _round_of(line)) > round_num:
                    break
                keep += len(line)
        if keep < file.stat().st_size:
            with open(file, "r+b") as handle:
                handle.truncate(keep)

    def run_at_end(self) -> None:
        """Call each ``at_end`` action; one that raises is logged (the run's outcome and
        files stay as they are)."""
        for action in self.at_end:
            try:
                action(self.path)
            except Exception:
                logger.exception("%s failed for the run folder %s",
                                 getattr(action, "__name__", action), self.path)

    def write_summary(self, result: TrainResult) -> None:
        best = result.best()
        atomic_write_json(self.path / SUMMARY, {
            "rounds_completed": result.rounds_completed,
            "stop_reason": result.stop_reason,
            "stopped_by": result.stopped_by,
            "best_round": best["round"] if best else None,
            "best_metrics": best,
            "final_metrics": result.final_metrics,
            "callback_errors": callback_error_counts(result.callback_errors),
            "wall_time": result.wall_time,
            **({"device": self.device} if self.device is not None else {}),
        })

    def wall_time(self) -> float:
        """The wall time ``summary.json`` records (0 when there is none)."""
        try:
            value = json.loads((self.path / SUMMARY).read_text(encoding="utf-8"))["wall_time"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0
        return float(value) if isinstance(value, int | float) else 0.0

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (a last line cut short by a kill is skipped)."""
        return read_jsonl(self.path / METRICS)

    def client_rows_after(self, round_num: int) -> Iterator[dict[str, Any]]:
        """The rows of ``clients.jsonl`` of rounds after ``round_num`` (which a resumed run
        redoes), read as they are taken (``iter_jsonl``: a last line cut short by a kill is
        skipped); rows of earlier rounds are skipped unparsed.

        Raises:
            InputError: naming the file and line, for another line that is not a JSON
                object, or a file that cannot be read.
        """
        def earlier(line: str) -> bool:
            match = _ROUND_PREFIX.match(line.encode())
            return match is not None and int(match.group(1)) <= round_num

        return (row for row in iter_jsonl(self.path / CLIENTS, skip=earlier)
                if not (isinstance(row.get("round"), int) and row["round"] <= round_num))


def _round_of(line: bytes) -> int:
    """The ``round`` of a ``clients.jsonl`` line not written by this version (a huge one when
    it cannot be read: the cut starts there)."""
    try:
        value = json.loads(line).get("round")
    except (ValueError, AttributeError):
        return 2**62
    return value if isinstance(value, int) else 2**62


def callback_error_counts(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s ``callback_errors``: the total and the count by ``callback.hook``."""
    by_callback = Counter(f"{e.get('callback')}.{e.get('hook')}" for e in errors)
    return {"total": len(errors), "by_callback": dict(by_callback)}
