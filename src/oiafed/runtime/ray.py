"""``runtime.mode: ray``: clients train in Ray actors, on a Ray cluster or a local one.

Install the extra: ``pip install 'oiafed[ray]'``. Ray is imported when a ray run starts.

* ``runtime.address``: ``auto`` (the cluster this machine belongs to), ``HOST:PORT`` of a
  cluster's head, or unset (``$RAY_ADDRESS`` if set, else a local Ray instance started for
  the run and shut down after it). When Ray is already initialised in this process
  (``ray.init(...)`` called by the user, with a ``runtime_env`` say), that connection is used
  and left open.
* ``runtime.workers`` actors (default: the cluster's CPUs / ``runtime.num_cpus_per_client``,
  at most the clients sampled per round), each reserving ``num_cpus_per_client`` CPUs. Each
  actor builds a ``ClientWorker`` from the config (sent as JSON) and keeps it for the run;
  the configured callbacks' epoch hooks run in the actors.

Only bytes and JSON cross: the global weights are safetensors bytes ``ray.put`` once per round
and fetched once per actor per round; updates come back as a JSON header and safetensors
bytes. An actor that dies is replaced and its client retried once (a second death gives a
``ClientFailure``), as in the parallel runtime; ``trainer.round_timeout`` bounds a round.

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
import sys
import time
from collections import deque
from typing import Any

from oiafed.config import ExperimentConfig
from oiafed.core.types import ClientFailure, ClientUpdate, Weights
from oiafed.exceptions import ConfigError
from oiafed.runtime.codec import (
    WireError,
    decode_json,
    decode_weights,
    encode_json,
    encode_weights,
    update_from_wire,
    update_header,
)
from oiafed.runtime.parallel import ATTEMPTS, STARTUP_TIMEOUT, WorkerError, warn_driver_only_hooks
from oiafed.runtime.worker import ClientWorker

__all__ = ["RayRuntime", "create", "import_ray"]

logger = logging.getLogger(__name__)

Outcome = ClientUpdate | ClientFailure


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


def create(cfg: ExperimentConfig, worker: ClientWorker) -> RayRuntime:
    """The Ray runtime for ``cfg`` (Ray itself is imported and started in ``start``)."""
    import_ray()  # fail before anything runs when Ray is missing
    return RayRuntime(cfg, worker)


class ClientActor:
    """A Ray actor's state: a ``ClientWorker`` built from the config, and the round's weights."""

    def __init__(self, config_json: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        cfg = ExperimentConfig.model_validate(decode_json(config_json.encode("utf-8")))
        self.worker = ClientWorker.from_config(cfg)
        self.loop = asyncio.new_event_loop()
        self.round_num: int | None = None
        self.weights: Weights = {}

    def ready(self) -> int:
        """This actor's process id (once it is built)."""
        return os.getpid()

    def train(self, round_num: int, weights_ref: list[Any], config_json: str, client_id: str
              ) -> tuple[bytes, bytes]:
        """Train ``client_id``; the JSON header and safetensors bytes of its update.

        ``weights_ref`` is ``[ObjectRef]`` (in a list, so Ray does not fetch it for every
        client): the round's global weights, fetched on the actor's first client of a round.
        """
        if self.round_num != round_num:
            import ray

            self.weights = decode_weights(ray.get(weights_ref[0]))
            self.round_num = round_num
        config = decode_json(config_json.encode("utf-8"))
        update = self.loop.run_until_complete(
            self.worker.train(client_id, self.weights, round_num, config))
        return encode_json(update_header(update)), encode_weights(update.weights)


class _Actor:
    """The driver's handle on one actor."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle = handle
        self.name = name
        self.client: str | None = None


class RayRuntime:
    """Trains sampled clients in Ray actors.

    Args:
        cfg: the experiment's config; actors rebuild everything from it.
        worker: the driver's own ``ClientWorker`` (kept for reference, not used to train).

    YAML:
        runtime: {mode: ray, address: auto, num_cpus_per_client: 1}
    """

    def __init__(self, cfg: ExperimentConfig, worker: ClientWorker) -> None:
        self.cfg = cfg
        self.worker = worker
        self.trainer: Any = None
        self.ray: Any = None
        self.started_ray = False
        self.actors: list[_Actor] = []
        self._actor_class: Any = None
        self._config_json = encode_json(cfg.model_dump(mode="json")).decode("utf-8")
        self._spawned = 0

    async def start(self, trainer: Any) -> None:
        """Connect to (or start) Ray and create the actors; wait until each is built.

        Raises:
            WorkerError: when an actor cannot be built or does not start in time.
        """
        self.trainer = trainer
        warn_driver_only_hooks(self.cfg, trainer, "ray")
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            self._init_ray()  # in this thread: Ray installs signal handlers in the main one
        per_client = self.cfg.runtime.num_cpus_per_client
        count = self.cfg.runtime.workers
        if count is None:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            count = max(1, int(cpus // per_client))
        count = max(1, min(count, getattr(trainer, "num_sampled", count)))
        self._actor_class = ray.remote(ClientActor).options(
            num_cpus=per_client, max_restarts=0, max_task_retries=0, max_concurrency=1)
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
            paths = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
            old = os.environ.get("PYTHONPATH")
            paths += [old] if old else []
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
        if address:
            _probe(address)
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

    async def train(
        self, round_num: int, client_ids: list[str], weights: Weights, config: dict[str, Any]
    ) -> list[Outcome]:
        """Train ``client_ids`` from ``weights``; outcomes in the order of ``client_ids``."""
        ray = self.ray
        try:
            config_json = encode_json(config).decode("utf-8")
        except (TypeError, ValueError) as exc:
            raise WorkerError(f"trainer.fit_config must hold JSON values to reach Ray actors: "
                              f"{exc}") from exc
        weights_ref = await asyncio.to_thread(ray.put, encode_weights(weights))
        timeout = getattr(self.trainer, "round_timeout", None)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: deque[str] = deque(dict.fromkeys(client_ids))
        deaths: dict[str, int] = {}
        outcomes: dict[str, Outcome] = {}
        running: dict[asyncio.Future[Any], _Actor] = {}
        wanted = len(set(client_ids))
        try:
            while len(outcomes) < wanted:
                for actor in self.actors:
                    if not pending:
                        break
                    if actor.client is None:
                        actor.client = cid = pending.popleft()
                        ref = actor.handle.train.remote(round_num, [weights_ref], config_json, cid)
                        running[asyncio.wrap_future(ref.future())] = actor
                remaining = None if deadline is None else deadline - time.monotonic()
                finished: set[asyncio.Future[Any]] = set()
                if running and (remaining is None or remaining > 0):
                    finished, _ = await asyncio.wait(running, timeout=remaining,
                                                     return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    self._expire(running, pending, outcomes, timeout)
                    break
                for future in finished:
                    actor = running.pop(future)
                    self._collect(round_num, actor, future, pending, deaths, outcomes)
        finally:
            for future in running:
                future.cancel()
        return [outcomes[cid] for cid in client_ids]

    def _collect(self, round_num: int, actor: _Actor, future: asyncio.Future[Any],
                 pending: deque[str], deaths: dict[str, int], outcomes: dict[str, Outcome]
                 ) -> None:
        ray, cid = self.ray, actor.client
        actor.client = None
        try:
            header, payload = future.result()
        except ray.exceptions.RayTaskError as exc:  # local training raised; the actor lives
            cause = getattr(exc, "cause", None) or exc
            error = f"{type(cause).__name__}: {cause}"
            if self.cfg.strict:
                raise WorkerError(f"round {round_num}: training {cid} failed in a Ray actor "
                                  f"(strict mode): {exc}") from exc
            logger.warning("round %d: training %s failed in %s: %s", round_num, cid, actor.name, exc)
            outcomes[cid] = ClientFailure(cid, error)
            return
        except ray.exceptions.RayError as exc:  # the actor (or its worker process) is gone
            if getattr(exc, "actor_init_failed", False):
                raise WorkerError(f"a Ray actor failed to start: {exc}") from exc
            self._replace(actor)
            deaths[cid] = count = deaths.get(cid, 0) + 1
            if count >= ATTEMPTS:
                outcomes[cid] = ClientFailure(
                    cid, f"the Ray actor training it died {count} times: {_first_line(exc)}")
            else:
                logger.warning("round %d: %s died while training %s (%s); replaced, %s is "
                               "retried", round_num, actor.name, cid, _first_line(exc), cid)
                pending.appendleft(cid)
            return
        try:
            update = update_from_wire(decode_json(header), payload)
        except WireError as exc:
            outcomes[cid] = ClientFailure(cid, f"malformed update: {exc}")
            return
        outcomes[cid] = (update if update.client_id == cid else
                         ClientFailure(cid, f"the actor answered for {update.client_id!r}"))

    def _replace(self, actor: _Actor) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor.handle, no_restart=True)
        if actor in self.actors:
            self.actors.remove(actor)
        self._spawn()

    def _expire(self, running: dict[asyncio.Future[Any], _Actor], pending: deque[str],
                outcomes: dict[str, Outcome], timeout: float | None) -> None:
        """The round deadline passed: clients without an update fail; busy actors are killed
        (their training may never end) and replaced."""
        for future, actor in list(running.items()):
            outcomes[actor.client] = ClientFailure(
                actor.client, f"no update within round_timeout={timeout:g}s")
            future.cancel()
            del running[future]
            self._replace(actor)
        for cid in pending:
            outcomes[cid] = ClientFailure(cid, f"not trained within round_timeout={timeout:g}s")
        pending.clear()

    async def close(self) -> None:
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


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast when ``HOST:PORT`` does not accept connections (``ray.init`` would retry
    for minutes). ``auto`` and addresses without a port are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise WorkerError(f"cannot reach the Ray cluster at {address!r} (runtime.address): "
                          f"{exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
