"""``runtime.mode: ray``: clients train in Ray actors, on a Ray cluster or a local one.

Install the extra: ``pip install 'oiafed[ray]'``. Ray is imported when a ray run starts.

* ``runtime.address``: ``auto`` (the cluster this machine belongs to), ``HOST:PORT`` of a
  cluster's head, or unset (``$RAY_ADDRESS`` if set, else a local Ray instance started for
  the run and shut down after it). When Ray is already initialised in this process
  (``ray.init(...)`` called by the user, with a ``runtime_env`` say), that connection is used
  and left open.
* ``runtime.workers`` actors (default: the cluster's CPUs / ``runtime.num_cpus_per_client``,
  at most the clients sampled per round), each reserving ``num_cpus_per_client`` CPUs and
  ``num_gpus_per_client`` GPUs (fractional, default 0; the learners' ``device`` is resolved
  in each actor, where Ray has set ``CUDA_VISIBLE_DEVICES`` to its GPU). Each
  actor builds a ``ClientWorker`` from the config (sent as JSON) and keeps it for the run;
  the configured callbacks' epoch hooks run in the actors.

Only bytes cross: the round's envelope is ``ray.put`` once per round and fetched once per actor
per round; each client's envelope goes with its call, and the update's envelope (or the
traceback of training that raised) comes back. The round's books and failure policy are the
``RoundLedger``'s: an actor that dies is replaced and its client retried once, as in the
parallel runtime; ``trainer.round_timeout`` bounds a round.

Every actor imports oiafed and the config's ``imports`` modules: on a cluster, install them on
every node or ship them with ``ray.init(runtime_env={"py_modules": [...]})`` before the run.
A local instance started here passes this process's ``sys.path`` on to its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from oiafed.config import ExperimentConfig
from oiafed.core.types import ClientTask, Outcome, RoundTask
from oiafed.exceptions import ConfigError, WorkerError
from oiafed.runtime.base import RoundLedger, RunEnd, RunSpec, Runtime
from oiafed.runtime.codec import decode_json, encode_json
from oiafed.runtime.envelope import encode_client, encode_round
from oiafed.runtime.parallel.driver import STARTUP_TIMEOUT
from oiafed.runtime.processes import ProcessSetup
from oiafed.runtime.worker import ClientWorker

__all__ = ["RayRuntime", "actor_options", "create", "import_ray"]

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ``ray`` package.

    Raises:
        ConfigError: when Ray is not installed (naming the extra to install).
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("runtime.mode ray needs Ray: pip install 'oiafed[ray]' "
                          f"({exc})", "runtime.mode") from exc
    return ray


def create(cfg: ExperimentConfig) -> RayRuntime:
    """The Ray runtime for ``cfg`` (Ray itself is imported and started in ``start``)."""
    import_ray()  # fail before anything runs when Ray is missing
    return RayRuntime(cfg)


def actor_options(runtime: Any) -> dict[str, Any]:
    """The options of each actor: ``num_cpus_per_client`` CPUs, ``num_gpus_per_client`` GPUs
    (fractional: Ray packs actors onto a GPU and sets their ``CUDA_VISIBLE_DEVICES``)."""
    return {"num_cpus": runtime.num_cpus_per_client, "num_gpus": runtime.num_gpus_per_client,
            "max_restarts": 0, "max_task_retries": 0, "max_concurrency": 1}


class ClientActor:
    """A Ray actor's state: a ``ClientWorker`` built from the config, and the round's bytes."""

    def __init__(self, config_json: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        cfg = ExperimentConfig.model_validate(decode_json(config_json.encode("utf-8")))
        self.worker = ClientWorker.from_config(cfg)
        self.call: int | None = None
        self.round_data = b""

    def ready(self) -> int:
        """This actor's process id (once it is built)."""
        return os.getpid()

    def train(self, call: int, round_ref: list[Any], client_data: bytes) -> tuple[bytes, str]:
        """Train the client of ``client_data``: the update's bytes, or b"" and the traceback.

        ``round_ref`` is ``[ObjectRef]`` (in a list, so Ray does not fetch it for every
        client): the round's envelope, fetched on the actor's first client of the runtime's
        ``call``-th ``train`` (a round's personal evaluation shares its round number).
        """
        if self.call != call:
            import ray

            self.round_data = ray.get(round_ref[0])
            self.call = call
        reply = self.worker.execute(self.round_data, client_data)
        return (b"", reply.traceback) if reply.update is None else (reply.update.to_bytes(), "")


class _Actor:
    """The driver's handle on one actor."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle = handle
        self.name = name
        self.client: str | None = None


class RayRuntime(Runtime):
    """Trains sampled clients in Ray actors.

    Args:
        cfg: the experiment's config; actors rebuild everything from it.

    YAML:
        runtime: {mode: ray, address: auto, num_cpus_per_client: 1}
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.spec = RunSpec(client_ids=(), num_sampled=1)
        self.ray: Any = None
        self.started_ray = False
        self.actors: list[_Actor] = []
        self._actor_class: Any = None
        self._config_json = encode_json(cfg.model_dump(mode="json")).decode("utf-8")
        self._spawned = 0
        self._calls = 0  # train calls so far: actors fetch a call's envelope once

    async def start(self, spec: RunSpec) -> None:
        """Connect to (or start) Ray and create the actors; wait until each is built.

        Raises:
            WorkerError: when an actor cannot be built or does not start in time.
        """
        self.spec = spec
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            self._init_ray()  # in this thread: Ray installs signal handlers in the main one
        per_client = self.cfg.runtime.num_cpus_per_client
        gpus = self.cfg.runtime.num_gpus_per_client
        count = self.cfg.runtime.workers
        if count is None:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            count = max(1, int(cpus // per_client))
            if gpus > 0:
                count = min(count, max(1, int(ray.cluster_resources().get("GPU", 0.0) // gpus)))
        count = max(1, min(count, spec.num_sampled))
        self._actor_class = ray.remote(ClientActor).options(**actor_options(self.cfg.runtime))
        try:
            for _ in range(count):
                self._spawn()
            await self._wait_ready(self.actors)
        except BaseException:
            await self.close()
            raise
        logger.info("ray runtime: %d actors of %g CPU(s) each", len(self.actors), per_client)

    def _init_ray(self) -> None:
        ray = self.ray
        address = self.cfg.runtime.address
        kwargs: dict[str, Any] = {}
        if not address and not os.environ.get("RAY_ADDRESS"):
            # a local instance: its workers import what this process can import
            pythonpath = ProcessSetup.here().pythonpath()
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
        if address:
            probe(address)
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address!r}" if address else "Ray"
            raise WorkerError(f"cannot start or reach {where}: {exc}") from exc
        self.started_ray = True

    def _spawn(self) -> _Actor:
        self._spawned += 1
        name = f"oiafed-actor-{self._spawned}"
        actor = _Actor(self._actor_class.remote(self._config_json, self.cfg.runtime.threads or 1),
                       name)
        self.actors.append(actor)
        return actor

    async def _wait_ready(self, actors: list[_Actor]) -> None:
        refs = [a.handle.ready.remote() for a in actors]
        done = await asyncio.to_thread(self.ray.wait, refs, num_returns=len(refs),
                                       timeout=STARTUP_TIMEOUT)
        if len(done[0]) < len(refs):
            resources = self.ray.cluster_resources()
            raise WorkerError(
                f"{len(refs) - len(done[0])} of {len(refs)} Ray actors did not start within "
                f"{STARTUP_TIMEOUT:g}s (each reserves {self.cfg.runtime.num_cpus_per_client:g} "
                f"CPUs; the cluster has {resources.get('CPU', 0):g}): lower runtime.workers or "
                "runtime.num_cpus_per_client")
        for ref in refs:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                raise WorkerError(f"a Ray actor failed to start: {exc}") from exc

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        ray = self.ray
        ledger = RoundLedger(task.round_num, [c.client_id for c in clients], deadline,
                             round_timeout=self.spec.round_timeout, strict=self.spec.strict)
        client_data = {c.client_id: encode_client(c) for c in clients}
        round_ref = await asyncio.to_thread(ray.put, encode_round(task))
        self._calls += 1
        running: dict[asyncio.Future[Any], _Actor] = {}
        try:
            while not ledger.done:
                for actor in self.actors:
                    if not ledger.pending:
                        break
                    if actor.client is None:
                        actor.client = cid = ledger.take()
                        assert cid is not None
                        ref = actor.handle.train.remote(self._calls, [round_ref],
                                                        client_data[cid])
                        running[asyncio.wrap_future(ref.future())] = actor
                remaining = ledger.remaining()
                finished: set[asyncio.Future[Any]] = set()
                if running and remaining != 0.0:
                    finished, _ = await asyncio.wait(running, timeout=remaining,
                                                     return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    self._expire(ledger, running)
                    break
                for future in finished:
                    self._collect(ledger, running.pop(future), future)
        finally:
            for future in running:
                future.cancel()
        return ledger.results()

    def _collect(self, ledger: RoundLedger, actor: _Actor, future: asyncio.Future[Any]) -> None:
        ray, cid = self.ray, actor.client
        actor.client = None
        assert cid is not None
        try:
            update, traceback = future.result()
        except ray.exceptions.RayError as exc:  # the actor (or its worker process) is gone
            if getattr(exc, "actor_init_failed", False):
                raise WorkerError(f"a Ray actor failed to start: {exc}") from exc
            self._replace(actor)
            ledger.died(cid, f"{actor.name}: {_first_line(exc)}")
            return
        if traceback:
            ledger.raised(cid, traceback)
        else:
            ledger.answered(cid, update)

    def _replace(self, actor: _Actor) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor.handle, no_restart=True)
        if actor in self.actors:
            self.actors.remove(actor)
        self._spawn()

    def _expire(self, ledger: RoundLedger, running: dict[asyncio.Future[Any], _Actor]) -> None:
        """The round deadline passed: clients without an update fail; busy actors are killed
        (their training may never end) and replaced."""
        ledger.expire()
        for future, actor in list(running.items()):
            future.cancel()
            del running[future]
            actor.client = None
            self._replace(actor)

    async def close(self, end: RunEnd | None = None) -> None:
        """Kill the actors; shut Ray down if this runtime started it."""
        ray, actors, self.actors = self.ray, self.actors, []
        if ray is None:
            return
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor.handle, no_restart=True)
        if self.started_ray:
            self.started_ray = False
            await asyncio.to_thread(ray.shutdown)


def probe(address: str, key: str = "runtime.address", timeout: float = 10.0) -> None:
    """Fail fast when ``HOST:PORT`` does not accept connections (``ray.init`` would retry
    for minutes); the error names the option ``key``. ``auto`` and addresses without a port
    are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise WorkerError(f"cannot reach the Ray cluster at {address!r} ({key}): "
                          f"{exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
