"""``runtime.mode: parallel``: worker processes on this machine train the sampled clients.

``runtime.workers`` processes (default: the CPU count, at most the clients sampled per round)
are started once per run, forked from a forkserver that has done the imports
(``runtime/processes.py``; spawned where there is none). Each one builds its own ``ClientWorker``
from the config (data partitions, model, learner and the configured callbacks, whose epoch
hooks then run in that process) and keeps it for the whole run, with
``torch.set_num_threads(runtime.threads or 1)``. The worker side is ``worker.py``. When the
learners' device is CUDA without an index (``cuda``, or ``auto`` on a CUDA machine), worker
``i`` trains on ``cuda:(i % visible GPUs)``: several workers share each GPU.

Per round, a worker receives the round's envelope once, before its first client of the round;
then client envelopes go to the workers as they free up, each holding ``QUEUE_DEPTH`` of them
(the one it trains and the next, so that it never waits for the driver between clients). A
client queued behind a straggler (``STRAGGLER_SECONDS``) goes to a free worker instead.

The round's books and the failure policy are the ``RoundLedger``'s (``runtime/base.py``): a
worker process that dies is replaced by a fresh one and its client retried once; training that
raises is a client failure (strict: the run fails); at the deadline the workers still training
are killed and replaced.

A script that runs a parallel experiment must guard its entry point with
``if __name__ == "__main__":`` (the forkserver and spawn start methods import the main module
again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from oiafed.config import ExperimentConfig
from oiafed.core.types import ClientTask, Outcome, RoundTask
from oiafed.device import learner_device_name, worker_device
from oiafed.exceptions import WireError, WorkerError
from oiafed.runtime import processes
from oiafed.runtime.base import RoundLedger, RunEnd, RunSpec, Runtime
from oiafed.runtime.codec import encode_json
from oiafed.runtime.envelope import encode_client, encode_round
from oiafed.runtime.parallel.worker import receive, worker_main

__all__ = ["ParallelRuntime", "create", "describe_exit"]

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 300.0
"""Seconds a worker process may take to import and build its data, model and learner."""
STOP_GRACE = 5.0
"""Seconds ``close`` waits for workers to exit before it kills them."""
POLL = 0.5
"""Seconds between checks of a stop request while waiting for workers."""
QUEUE_DEPTH = 2
"""Client ids a worker holds at once: the one it trains and those it trains next."""
STRAGGLER_SECONDS = 1.0
"""A client trained this long, and 3x the round's mean so far, is a straggler: a free worker
takes the client queued behind it."""


def create(cfg: ExperimentConfig) -> ParallelRuntime:
    """The parallel runtime for ``cfg``."""
    return ParallelRuntime(cfg)


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


class _Process:
    """The driver's handle on one worker process."""

    def __init__(self, ctx: Any, name: str, slot: int, init: bytes) -> None:
        conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(child,), name=name, daemon=True)
        self.process.start()
        child.close()  # only the child holds its end: its death is an EOF here
        self.conn: Connection = conn
        self.name = name
        self.slot = slot  # its place among the workers: which GPU it has (a replacement's too)
        self.state = "starting"  # -> "ready"
        self.clients: deque[str] = deque()  # assigned, in order; the first is training
        self.revoked: set[str] = set()  # given to another worker; its update may still come
        self.since = 0.0  # when the client at the head of ``clients`` started (monotonic)
        self.call: int | None = None  # the train call whose round envelope it holds
        conn.send_bytes(init)
        conn.send_bytes(b"")

    @property
    def pid(self) -> int | None:
        return self.process.pid

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
    """One ``train`` call as the driver runs it: the ledger, the messages, how long clients
    took. ``key`` tells its messages apart from another call's (a round's personal evaluation
    shares its round number)."""

    def __init__(self, ledger: RoundLedger, key: int, message: bytes, payload: bytes,
                 clients: dict[str, bytes]) -> None:
        self.ledger = ledger
        self.key = key
        self.message = message
        self.payload = payload
        self.clients = clients  # client id -> its envelope
        self.trained, self.training_time = 0, 0.0  # clients answered, their summed seconds

    def straggling(self, seconds: float) -> bool:
        """Whether a client running for ``seconds`` is far slower than this round's others."""
        mean = self.training_time / self.trained if self.trained else 0.0
        return seconds > max(STRAGGLER_SECONDS, 3 * mean)


class ParallelRuntime(Runtime):
    """Trains sampled clients in parallel in ``runtime.workers`` worker processes.

    Args:
        cfg: the experiment's config; workers rebuild everything from it.

    YAML:
        runtime: {mode: parallel, workers: 4, threads: 1}
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.num_workers = cfg.runtime.workers or os.cpu_count() or 1
        self.spec = RunSpec(client_ids=(), num_sampled=self.num_workers)
        self._ctx = processes.context()
        self._init: dict[str, Any] = {}
        self._procs: list[_Process] = []
        self._calls = 0  # train calls so far: each one's messages carry its number
        self._spawned = 0
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._driver_threads = 0  # torch's thread count in the driver before the run

    @property
    def pids(self) -> list[int]:
        """The process ids of the current worker processes."""
        return [p.pid for p in self._procs if p.pid is not None]

    async def start(self, spec: RunSpec) -> None:
        """Start the worker processes and wait until each has built its ``ClientWorker``.

        Raises:
            WorkerError: when a worker fails to start (its error is in the message).
        """
        self.spec = spec
        setup = processes.ProcessSetup.here()
        self._init = {"op": "init", "config": self.cfg.model_dump(mode="json"),
                      "threads": self.cfg.runtime.threads or 1,
                      "sys_path": list(setup.sys_path), "cwd": setup.cwd}
        count = max(1, min(self.num_workers, spec.num_sampled))
        try:
            await asyncio.to_thread(self._start, count)
        except BaseException:
            await asyncio.to_thread(self._shutdown)
            raise
        # Between rounds the workers wait for the driver's aggregation and evaluation: let
        # those use the workers' cores (torch's threads sleep while the workers train).
        self._driver_threads = torch.get_num_threads()
        torch.set_num_threads(max(self._driver_threads, min(count, os.cpu_count() or 1)))

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        ledger = RoundLedger(task.round_num, [c.client_id for c in clients], deadline,
                             round_timeout=self.spec.round_timeout, strict=self.spec.strict)
        self._calls += 1
        work = _Round(ledger, self._calls, encode_json({"op": "round", "round": self._calls}),
                      encode_round(task), {c.client_id: encode_client(c) for c in clients})
        return await asyncio.to_thread(self._train, work)

    async def close(self, end: RunEnd | None = None) -> None:
        """Stop the workers (killing those that do not exit within ``STOP_GRACE`` seconds)."""
        self._stop.set()
        if self._driver_threads:
            torch.set_num_threads(self._driver_threads)
        await asyncio.to_thread(self._close)

    # -- the work, in a thread so that the event loop stays free -----------------------------

    def _spawn(self, slot: int | None = None) -> _Process:
        """A new worker process in ``slot`` (a replaced one's; None: the next)."""
        if self._stop.is_set():  # closing: a replacement would outlive the runtime
            raise WorkerError("the parallel runtime is closing")
        slot = self._spawned if slot is None else slot
        # worker i trains on GPU i % (visible GPUs) when the learners' device is CUDA
        device = worker_device(learner_device_name(self.cfg), slot)
        self._spawned += 1
        proc = _Process(self._ctx, f"oiafed-worker-{self._spawned}", slot,
                        encode_json({**self._init, "device": device}))
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
        ledger = work.ledger
        with self._busy:
            while not ledger.done:
                if self._stop.is_set():
                    raise WorkerError("the parallel runtime was closed during a round")
                self._dispatch(work)
                if ledger.done:
                    break
                remaining = ledger.remaining()
                if remaining == 0.0:
                    self._expire(work)
                    break
                self._poll(work, POLL if remaining is None else min(POLL, remaining))
            return ledger.results()

    def _dispatch(self, work: _Round) -> None:
        """Top up every ready worker's queue, a level at a time (the first clients spread)."""
        ledger = work.ledger
        for depth in range(1, QUEUE_DEPTH + 1):
            for proc in list(self._procs):
                if not ledger.pending:
                    self._rebalance(work)
                    return
                if proc.state != "ready" or len(proc.clients) >= depth:
                    continue
                cid = ledger.take()
                assert cid is not None
                try:
                    if proc.call != work.key:
                        proc.send(work.message, work.payload)
                        proc.call = work.key
                    proc.send(encode_json({"op": "train", "client_id": cid}), work.clients[cid])
                except OSError:
                    ledger.give_back(cid)  # it never started training: not a try
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
            if work.ledger.pending or proc.state != "ready" or proc.clients:
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
                                         "round": work.key}))
            work.ledger.give_back(cid)
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
                    header, payload = receive(proc.conn)
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
        cid = header.get("client_id")
        if cid in proc.revoked:  # skipped, or trained before the revoke: counts if awaited
            proc.revoked.discard(cid)
            if work is None or header.get("round") != work.key:
                return  # the answer of a revoked copy after its round ended
        elif proc.clients:
            cid = proc.clients.popleft()
            now = time.monotonic()
            if work is not None:
                work.trained += 1
                work.training_time += now - proc.since
            proc.since = now
        if not isinstance(cid, str) or work is None or header.get("round") != work.key:
            logger.warning("%s sent an unexpected %r message; ignored", proc.name, op)
            return
        if op == "update":
            work.ledger.answered(cid, payload)
        elif op == "error":
            work.ledger.raised(cid, str(header.get("traceback", "")))
        elif op != "skipped":
            work.ledger.failed(cid, f"unexpected message {op!r} from the worker", "malformed")

    def _died(self, proc: _Process, work: _Round | None) -> None:
        """``proc`` is gone: replace it, and retry (or fail) the client it was training."""
        if proc not in self._procs:
            return
        self._procs.remove(proc)
        how = describe_exit(proc.exit_code())
        proc.kill()
        if proc.state == "starting":
            raise WorkerError(
                f"worker process {proc.name} (pid {proc.pid}) ended ({how}) before it "
                "was ready; its output is above. A script that runs the parallel runtime must "
                "guard its entry point with `if __name__ == \"__main__\":` (worker processes "
                "import the main module)")
        self._spawn(proc.slot)
        if not proc.clients or work is None:
            logger.warning("worker process %s (pid %s) ended (%s) while idle; replaced",
                           proc.name, proc.pid, how)
            return
        cid, *queued = proc.clients
        for queued_cid in reversed(queued):  # they never started training: not a try
            work.ledger.give_back(queued_cid)
        work.ledger.died(cid, f"{how}, pid {proc.pid}")

    def _expire(self, work: _Round) -> None:
        """The round deadline passed: clients without an update fail; busy workers are killed
        (their training may never end) and replaced."""
        work.ledger.expire()
        for proc in list(self._procs):
            if proc.clients:
                self._procs.remove(proc)
                proc.kill()
                self._spawn(proc.slot)

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
