"""``runtime.mode: parallel``: worker processes on this machine train the sampled clients.

``runtime.workers`` processes (default: the CPU count, at most the clients sampled per round)
are started once per run with the "spawn" method. Each one builds its own ``ClientWorker``
from the config (data partitions, model, learner and the configured callbacks, whose epoch
hooks then run in that process) and keeps it for the whole run, with
``torch.set_num_threads(runtime.threads or 1)``.

Nothing crosses a process boundary pickled: each message is two raw frames on a pipe
(``Connection.send_bytes``), a JSON header and a payload of safetensors bytes (or nothing).
Per round, a worker receives the global weights once, before its first client of the round;
then client ids go to the workers as they free up, each holding ``QUEUE_DEPTH`` of them (the
one it trains and the next, so that it never waits for the driver between clients); the
updates come back in the order of ``client_ids`` whatever order they finished in. A client
queued behind a straggler (``STRAGGLER_SECONDS``) goes to a free worker instead.

A worker process that dies (killed, out of memory, a crash in native code) is replaced by a
fresh one and the client it was training is retried once; a second death gives that client a
``ClientFailure`` (the trainer calls ``on_client_failure`` and the round goes on). An
exception in local training gives a ``ClientFailure`` too (with ``strict: true`` it stops
the run). ``trainer.round_timeout`` bounds a round: clients without an update by then fail
and the workers still training them are killed and replaced.

A script that runs a parallel experiment must guard its entry point with
``if __name__ == "__main__":`` (the "spawn" start method imports the main module again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from oiafed.callbacks.base import Callback
from oiafed.config import ExperimentConfig
from oiafed.core.types import ClientFailure, ClientUpdate, Weights
from oiafed.exceptions import WorkerError
from oiafed.runtime.codec import (
    WireError,
    decode_json,
    decode_weights,
    encode_json,
    encode_weights,
    update_from_wire,
    update_header,
)
from oiafed.runtime.worker import ClientWorker

__all__ = ["ParallelRuntime", "WorkerError", "create"]

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 300.0
"""Seconds a worker process may take to import and build its data, model and learner."""
STOP_GRACE = 5.0
"""Seconds ``close`` waits for workers to exit before it kills them."""
POLL = 0.5
"""Seconds between checks of a stop request while waiting for workers."""
ATTEMPTS = 2
"""Tries a client gets when the process training it dies (the first and one retry)."""
QUEUE_DEPTH = 2
"""Client ids a worker holds at once: the one it trains and those it trains next."""
SEND_BUFFER = 8 * 2**20
"""Bytes of socket send buffer a worker asks for (the system caps it: net.core.wmem_max)."""
STRAGGLER_SECONDS = 1.0
"""A client trained this long, and 3x the round's mean so far, is a straggler: a free worker
takes the client queued behind it."""

Outcome = ClientUpdate | ClientFailure


def create(cfg: ExperimentConfig, worker: ClientWorker) -> ParallelRuntime:
    """The parallel runtime for ``cfg`` (``worker``, the driver's own, is not used to train)."""
    return ParallelRuntime(cfg, worker)


def warn_driver_only_hooks(cfg: ExperimentConfig, trainer: Any, mode: str) -> None:
    """Log a warning when callbacks given as instances (not in the config) have epoch hooks:
    learners run elsewhere and rebuild only the configured callbacks."""
    manager = getattr(trainer, "callbacks", None)
    extra = list(getattr(manager, "callbacks", []))[len(cfg.callbacks):]
    names = [type(cb).__name__ for cb in extra if _has_epoch_hooks(cb)]
    if names:
        logger.warning(
            "runtime.mode %s: the epoch hooks of %s (callback instances, not in the config) "
            "run only in serial mode; learners in other processes rebuild the callbacks of the "
            "config. Register the callback and list it under callbacks: to run its epoch hooks "
            "where the learners run.", mode, ", ".join(names))


def _has_epoch_hooks(callback: Any) -> bool:
    for hook in ("on_epoch_start", "on_epoch_end"):
        method = getattr(type(callback), hook, None)
        if method is not None and method is not getattr(Callback, hook):
            return True
    return False


def describe_exit(code: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` for a process's exit code."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------------
# Inside a worker process


def _send(conn: Connection, header: dict[str, Any], payload: bytes = b"") -> None:
    conn.send_bytes(encode_json(header))
    conn.send_bytes(payload)


def _recv(conn: Connection) -> tuple[dict[str, Any], bytes]:
    header = decode_json(conn.recv_bytes())
    return header, conn.recv_bytes()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _widen_send_buffer(conn: Connection) -> None:
    """Let an update fit in the kernel's buffer (as far as the system allows), so the worker
    goes on to its next client without waiting for the driver to read the last one."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _take_revoke(inbox: deque[tuple[dict[str, Any], bytes]], cid: str, round_num: int) -> bool:
    """Whether ``inbox`` revokes ``cid`` in ``round_num`` (the revoke is then removed)."""
    wanted = {"op": "revoke", "client_id": cid, "round": round_num}
    for message in inbox:
        if message[0] == wanted:
            inbox.remove(message)
            return True
    return False


def worker_main(conn: Connection) -> None:
    """A worker process: build a ``ClientWorker`` from the config, then train clients on
    request until told to stop or the driver goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops us
    try:
        init, _ = _recv(conn)
        torch.set_num_threads(int(init.get("threads") or 1))
        cfg = ExperimentConfig.model_validate(init["config"])
        worker = ClientWorker.from_config(cfg)
    except EOFError:
        return
    except Exception as exc:
        _send(conn, {"op": "fatal", "error": _error_text(exc), "traceback": traceback.format_exc()})
        return
    _send(conn, {"op": "ready", "pid": os.getpid()})
    _widen_send_buffer(conn)
    loop = asyncio.new_event_loop()
    inbox: deque[tuple[dict[str, Any], bytes]] = deque()  # read ahead, not yet acted on
    weights: Weights = {}
    round_num, config = 0, {}
    try:
        while True:
            try:
                header, payload = inbox.popleft() if inbox else _recv(conn)
            except (EOFError, OSError):
                return  # the driver is gone
            op = header.get("op")
            if op == "stop":
                return
            if op == "round":
                round_num, config = int(header["round"]), dict(header["config"])
                weights = decode_weights(payload)
            elif op == "train":
                cid = header["client_id"]
                while conn.poll():
                    inbox.append(_recv(conn))
                if _take_revoke(inbox, cid, round_num):  # another worker has it now
                    _send(conn, {"op": "skipped", "client_id": cid, "round": round_num})
                    continue
                try:
                    update = loop.run_until_complete(worker.train(cid, weights, round_num, config))
                    data = encode_weights(update.weights)
                except Exception as exc:
                    _send(conn, {"op": "error", "client_id": cid, "round": round_num,
                                 "error": _error_text(exc), "traceback": traceback.format_exc()})
                    continue
                _send(conn, {"op": "update", "round": round_num, **update_header(update)}, data)
    except (EOFError, OSError):
        return  # a send failed: the driver is gone
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------
# In the driver


class _Process:
    """The driver's handle on one worker process."""

    def __init__(self, ctx: Any, name: str, init: bytes) -> None:
        conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(child,), name=name, daemon=True)
        self.process.start()
        child.close()  # only the child holds its end: its death is an EOF here
        self.conn: Connection = conn
        self.name = name
        self.state = "starting"  # -> "ready"
        self.clients: deque[str] = deque()  # assigned, in order; the first is training
        self.revoked: set[str] = set()  # given to another worker; its update may still come
        self.since = 0.0  # when the client at the head of ``clients`` started (monotonic)
        self.round: int | None = None
        conn.send_bytes(init)
        conn.send_bytes(b"")

    def send(self, header: bytes, payload: bytes = b"") -> None:
        self.conn.send_bytes(header)
        self.conn.send_bytes(payload)

    def exit_code(self, timeout: float = 1.0) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(STOP_GRACE)
        self.conn.close()


class _Round:
    """The bookkeeping of one round's clients."""

    def __init__(self, round_num: int, client_ids: list[str], message: bytes, payload: bytes):
        self.round_num = round_num
        self.client_ids = client_ids
        self.message = message
        self.payload = payload
        self.pending: deque[str] = deque(dict.fromkeys(client_ids))
        self.deaths: dict[str, int] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.trained, self.training_time = 0, 0.0  # clients answered, their summed seconds

    def straggling(self, seconds: float) -> bool:
        """Whether a client running for ``seconds`` is far slower than this round's others."""
        mean = self.training_time / self.trained if self.trained else 0.0
        return seconds > max(STRAGGLER_SECONDS, 3 * mean)

    @property
    def done(self) -> bool:
        return len(self.outcomes) == len(set(self.client_ids))


class ParallelRuntime:
    """Trains sampled clients in parallel in ``runtime.workers`` worker processes.

    Args:
        cfg: the experiment's config; workers rebuild everything from it.
        worker: the driver's own ``ClientWorker`` (kept for reference, not used to train).

    YAML:
        runtime: {mode: parallel, workers: 4, threads: 1}
    """

    def __init__(self, cfg: ExperimentConfig, worker: ClientWorker) -> None:
        self.cfg = cfg
        self.worker = worker
        self.num_workers = cfg.runtime.workers or os.cpu_count() or 1
        self.strict = cfg.strict
        self.trainer: Any = None
        self._ctx = mp.get_context("spawn")
        self._init = encode_json({"op": "init", "config": cfg.model_dump(mode="json"),
                                  "threads": cfg.runtime.threads or 1})
        self._procs: list[_Process] = []
        self._spawned = 0
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._driver_threads = 0  # torch's thread count in the driver before the run

    @property
    def pids(self) -> list[int]:
        """The process ids of the current worker processes."""
        return [p.process.pid for p in self._procs]

    async def start(self, trainer: Any) -> None:
        """Start the worker processes and wait until each has built its ``ClientWorker``.

        Raises:
            WorkerError: when a worker fails to start (its error is in the message).
        """
        self.trainer = trainer
        warn_driver_only_hooks(self.cfg, trainer, "parallel")
        sampled = getattr(trainer, "num_sampled", self.num_workers)
        count = max(1, min(self.num_workers, sampled))
        try:
            await asyncio.to_thread(self._start, count)
        except BaseException:
            await asyncio.to_thread(self._shutdown)
            raise
        # Between rounds the workers wait for the driver's aggregation and evaluation: let
        # those use the workers' cores (torch's threads sleep while the workers train).
        self._driver_threads = torch.get_num_threads()
        torch.set_num_threads(max(self._driver_threads, min(count, os.cpu_count() or 1)))

    async def train(
        self, round_num: int, client_ids: list[str], weights: Weights, config: dict[str, Any]
    ) -> list[Outcome]:
        """Train ``client_ids`` from ``weights``; outcomes in the order of ``client_ids``."""
        try:
            message = encode_json({"op": "round", "round": round_num, "config": config})
        except (TypeError, ValueError) as exc:
            raise WorkerError(f"trainer.fit_config must hold JSON values to reach worker "
                              f"processes: {exc}") from exc
        work = _Round(round_num, list(client_ids), message, encode_weights(weights))
        return await asyncio.to_thread(self._train, work)

    async def close(self) -> None:
        """Stop the workers (killing those that do not exit within ``STOP_GRACE`` seconds)."""
        self._stop.set()
        if self._driver_threads:
            torch.set_num_threads(self._driver_threads)
        await asyncio.to_thread(self._close)

    # -- the work, in a thread so that the event loop stays free -----------------------------

    def _spawn(self) -> _Process:
        self._spawned += 1
        proc = _Process(self._ctx, f"oiafed-worker-{self._spawned}", self._init)
        self._procs.append(proc)
        return proc

    def _start(self, count: int) -> None:
        for _ in range(count):
            self._spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while any(p.state == "starting" for p in self._procs):
            if self._stop.is_set():
                raise WorkerError("stopped while the worker processes started")
            if time.monotonic() > deadline:
                raise WorkerError(f"worker processes did not start within {STARTUP_TIMEOUT:g}s")
            self._poll(None, POLL)
        logger.info("parallel runtime: %d worker processes (pids %s)", len(self._procs),
                    ", ".join(map(str, self.pids)))

    def _train(self, work: _Round) -> list[Outcome]:
        with self._busy:
            timeout = getattr(self.trainer, "round_timeout", None)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not work.done:
                if self._stop.is_set():
                    raise WorkerError("the parallel runtime was closed during a round")
                self._dispatch(work)
                if work.done:
                    break
                remaining = POLL if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    self._expire(work, timeout)
                    break
                self._poll(work, min(POLL, remaining))
            return [work.outcomes[cid] for cid in work.client_ids]

    def _dispatch(self, work: _Round) -> None:
        """Top up every ready worker's queue, a level at a time (the first clients spread)."""
        for depth in range(1, QUEUE_DEPTH + 1):
            for proc in list(self._procs):
                if not work.pending:
                    self._rebalance(work)
                    return
                if proc.state != "ready" or len(proc.clients) >= depth:
                    continue
                cid = work.pending.popleft()
                try:
                    if proc.round != work.round_num:
                        proc.send(work.message, work.payload)
                        proc.round = work.round_num
                    proc.send(encode_json({"op": "train", "client_id": cid}))
                except OSError:
                    work.pending.appendleft(cid)  # it never started training: not a try
                    self._died(proc, work)
                    continue
                if not proc.clients:
                    proc.since = time.monotonic()
                proc.clients.append(cid)

    def _rebalance(self, work: _Round) -> None:
        """With nothing left to hand out, a free worker takes the last client queued behind
        a straggler (revoked there): a slow or hung client holds up nobody else. (Not behind
        any busy worker: that client may be starting, and would then train twice.)"""
        now = time.monotonic()
        for proc in list(self._procs):
            if work.pending or proc.state != "ready" or proc.clients:
                continue
            victim = max((p for p in self._procs
                          if len(p.clients) > 1 and work.straggling(now - p.since)),
                         key=lambda p: len(p.clients), default=None)
            if victim is None:
                return
            cid = victim.clients.pop()
            victim.revoked.add(cid)
            with contextlib.suppress(OSError):  # a dead victim is noticed by the next poll
                victim.send(encode_json({"op": "revoke", "client_id": cid,
                                         "round": work.round_num}))
            work.pending.append(cid)
            self._dispatch(work)

    def _poll(self, work: _Round | None, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for messages or deaths, and handle them."""
        owners: dict[Any, _Process] = {}
        for proc in self._procs:
            owners[proc.conn] = proc
            owners[proc.process.sentinel] = proc
        ready = wait(list(owners), timeout)
        for proc in dict.fromkeys(owners[obj] for obj in ready):
            try:
                while proc.conn.poll():
                    header, payload = _recv(proc.conn)
                    self._handle(proc, header, payload, work)
            except (EOFError, OSError, WireError):
                self._died(proc, work)
                continue
            if not proc.process.is_alive():
                self._died(proc, work)

    def _handle(self, proc: _Process, header: dict[str, Any], payload: bytes,
                work: _Round | None) -> None:
        op = header.get("op")
        if op == "ready":
            proc.state = "ready"
            return
        if op == "fatal":
            detail = header.get("traceback") or ""
            raise WorkerError(f"a worker process failed to start: {header.get('error')}\n{detail}")
        if header.get("client_id") in proc.revoked:  # skipped, or trained before the revoke
            cid = header["client_id"]
            proc.revoked.discard(cid)
            if (op != "update" or work is None or header.get("round") != work.round_num
                    or cid in work.outcomes):
                return
        else:
            cid = proc.clients.popleft() if proc.clients else None
            now = time.monotonic()
            if work is not None:
                work.trained += 1
                work.training_time += now - proc.since
            proc.since = now
        if cid is None or work is None:
            logger.warning("%s sent an unexpected %r message; ignored", proc.name, op)
            return
        if cid in work.outcomes:
            return  # the other worker's copy of a revoked client came first: the same result
        if op == "update":
            try:
                outcome: Outcome = update_from_wire(header, payload)
            except WireError as exc:
                outcome = ClientFailure(cid, f"malformed update: {exc}")
            if outcome.client_id != cid:
                outcome = ClientFailure(cid, f"the worker answered for {outcome.client_id!r}")
        elif op == "error":
            error = str(header.get("error"))
            if self.strict:
                raise WorkerError(f"round {work.round_num}: training {cid} failed in a worker "
                                  f"process (strict mode): {error}\n{header.get('traceback', '')}")
            logger.warning("round %d: training %s failed in %s: %s\n%s", work.round_num, cid,
                           proc.name, error, header.get("traceback", ""))
            outcome = ClientFailure(cid, error)
        else:
            outcome = ClientFailure(cid, f"unexpected message {op!r} from the worker")
        work.outcomes[cid] = outcome

    def _died(self, proc: _Process, work: _Round | None) -> None:
        """``proc`` is gone: replace it, and retry (or fail) the client it was training."""
        if proc not in self._procs:
            return
        self._procs.remove(proc)
        how = describe_exit(proc.exit_code())
        proc.kill()
        if proc.state == "starting":
            raise WorkerError(
                f"worker process {proc.name} (pid {proc.process.pid}) ended ({how}) before it "
                "was ready; its output is above. A script that runs the parallel runtime must "
                "guard its entry point with `if __name__ == \"__main__\":` (worker processes "
                "import the main module)")
        self._spawn()
        if not proc.clients or work is None:
            logger.warning("worker process %s (pid %s) ended (%s) while idle; replaced",
                           proc.name, proc.process.pid, how)
            return
        cid, *queued = proc.clients
        work.pending.extendleft(reversed(queued))  # they never started training: not a try
        work.deaths[cid] = deaths = work.deaths.get(cid, 0) + 1
        if deaths >= ATTEMPTS:
            error = (f"the worker process training it ended ({how}) {deaths} times "
                     f"(pid {proc.process.pid} the last time)")
            work.outcomes[cid] = ClientFailure(cid, error)
            return
        logger.warning("round %d: worker process %s (pid %s) ended (%s) while training %s; "
                       "replaced, %s is retried", work.round_num, proc.name, proc.process.pid,
                       how, cid, cid)
        work.pending.appendleft(cid)

    def _expire(self, work: _Round, timeout: float | None) -> None:
        """The round deadline passed: clients without an update fail; busy workers are killed
        (their training may never end) and replaced."""
        for proc in list(self._procs):
            if proc.clients:
                training = proc.clients.popleft()
                work.outcomes[training] = ClientFailure(
                    training, f"no update within round_timeout={timeout:g}s")
                work.pending.extendleft(reversed(proc.clients))
                self._procs.remove(proc)
                proc.kill()
                self._spawn()
        for cid in work.pending:
            work.outcomes[cid] = ClientFailure(cid, f"not trained within round_timeout={timeout:g}s")
        work.pending.clear()

    def _close(self) -> None:
        # a round cancelled mid-way (Ctrl-C) ends within POLL seconds of the stop request
        acquired = self._busy.acquire(timeout=STOP_GRACE + POLL)
        try:
            self._shutdown()
        finally:
            if acquired:
                self._busy.release()

    def _shutdown(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.state == "starting":  # nothing to lose, and it may take seconds to listen
                proc.kill()
                continue
            with contextlib.suppress(OSError):
                proc.send(encode_json({"op": "stop"}))
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            proc.process.join(max(0.0, deadline - time.monotonic()))
            proc.kill()
