"""What local training needs, built from the config alone, in whatever process runs it.

Every runtime trains clients through a ``ClientWorker``: in this process (serial, with
``train``), in worker processes (parallel), in Ray actors or in gRPC client processes (all
three through the one entry point ``execute``: task bytes in, update bytes or an error out).
A remote worker is rebuilt from the config (registry names + args), never from pickled
objects; partitions, model initialisation and data order come from the seed, so every worker
agrees.
"""

from __future__ import annotations

import asyncio
import copy
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from oiafed import registry
from oiafed.callbacks.base import CallbackManager
from oiafed.config import ExperimentConfig
from oiafed.core.learner import EVALUATE, TASK, Learner
from oiafed.core.types import ClientTask, ClientUpdate, RoundTask
from oiafed.data.arrays import ArrayDataset
from oiafed.data.federated import FederatedData, FederatedSource, build_federated_data
from oiafed.data.local_test import split_own_data
from oiafed.device import CPU, apply_determinism, learner_device_name, resolve_device
from oiafed.exceptions import ConfigError, InputError
from oiafed.privacy.base import Privacy
from oiafed.runtime.envelope import decode_client, decode_round, pack_update
from oiafed.runtime.tensors import Payload
from oiafed.seeding import INIT, derive_seed


def _trains_privately(privacy_type: str) -> bool:
    """Whether a ``privacy:`` section of this type changes the clients' training (local DP;
    central DP is all on the server, and its accounting library is not needed here)."""
    kind = registry.get("privacy", privacy_type, path="privacy.type")
    return getattr(kind, "client_training", None) is not Privacy.client_training


class ModelInput(Protocol):
    """What building a model takes from the data (a ``FederatedSource``, an ``ArrayDataset``)."""

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def num_classes(self) -> int: ...


def build_model(cfg: ExperimentConfig, data: ModelInput) -> nn.Module:
    """The configured model, initialised from the seed (without touching the global RNG).

    Raises:
        ConfigError: naming ``model.args`` when the model cannot be allocated.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, INIT))
        try:
            return registry.build("model", cfg.model.model_dump(), "model",
                                  input_shape=data.input_shape, num_classes=data.num_classes)
        except (MemoryError, RuntimeError) as exc:
            if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
                raise
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"cannot allocate model {cfg.model.type!r}: {reason}",
                              "model.args") from None


def build_callbacks(cfg: ExperimentConfig) -> list[Any]:
    """The configured callbacks, in config order."""
    return [registry.build("callback", section.model_dump(), f"callbacks[{i}]")
            for i, section in enumerate(cfg.callbacks)]


DATA_CACHE_BYTES = 256 * 2**20
"""Clients' local datasets kept between rounds by one worker (least recently used go first)."""


def _nbytes(data: ArrayDataset) -> int:
    return data.x.nelement() * data.x.element_size() + data.y.nelement() * data.y.element_size()


def _moved(data: ArrayDataset, device: torch.device) -> ArrayDataset:
    return ArrayDataset(data.x.to(device), data.y.to(device), data.num_classes)


@dataclass(frozen=True)
class TaskReply:
    """What ``ClientWorker.execute`` gives back: the update (an envelope ``Payload``, written
    whole or in pieces by the transport), or the traceback text of the exception that
    training raised."""

    update: Payload | None = None
    traceback: str = ""


class ClientWorker:
    """Trains any client of the federation with one reusable ``Learner`` (and model).

    For a partitioned pool, recently trained clients' datasets stay cached (up to
    ``DATA_CACHE_BYTES`` in all), so nothing is copied again for a client sampled again;
    on-demand sources keep their own bounded cache. With ``local`` (a gRPC client's
    ``--local-data``), every client id trains on that one dataset, and ``local_test`` is its
    local test set (with ``data.local_test_fraction``). With ``resident``, the cached datasets
    are kept on the learner's device (moved there once, not every round).
    """

    def __init__(self, learner: Learner, data: FederatedSource | None,
                 local: ArrayDataset | None = None, resident: bool = False,
                 local_test: ArrayDataset | None = None) -> None:
        self.learner = learner
        self.data = data
        self.local = local
        self.local_test = local_test
        device = getattr(learner, "device", CPU)
        self.resident_on: torch.device | None = device if resident and device != CPU else None
        if local is not None and self.resident_on is not None:
            self.local = _moved(local, self.resident_on)
        self._cache: OrderedDict[str, ArrayDataset] = OrderedDict()
        self._cache_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._round_data: object = None
        self._round: RoundTask | None = None

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        *,
        callbacks: CallbackManager | None = None,
        data: FederatedSource | None = None,
        model: nn.Module | None = None,
        local_data: bool = False,
        device: str | torch.device | None = None,
    ) -> ClientWorker:
        """Build a worker; without ``callbacks`` it builds the configured ones itself. With
        ``local_data``, the configured dataset is loaded whole and trained on by every client
        (less its local test set, with ``data.local_test_fraction``).
        The learner trains on ``device`` (default: ``runtime.device``, else ``device``, of
        ``cfg``) in ``cfg.precision``; ``cfg.deterministic`` is applied to this process.

        Raises:
            ConfigError: for a device not available here (before anything is built).
            InputError: with ``local_data``, for a dataset that is not one local dataset.
        """
        where = resolve_device(learner_device_name(cfg) if device is None else device,
                               "runtime.device" if cfg.runtime.device else "device")
        apply_determinism(cfg.deterministic)
        registry.import_modules(cfg.imports)
        local = local_test = None
        if local_data:
            local = registry.build("dataset", {"type": cfg.data.type, "args": cfg.data.args},
                                   "data", seed=cfg.seed)
            if not isinstance(local, ArrayDataset) or not hasattr(local, "input_shape"):
                raise InputError(f"data.type {cfg.data.type!r} does not load one local dataset; "
                                 "--local-data needs one such as digits or mnist")
            model = build_model(cfg, local)
            if cfg.data.local_test_fraction > 0:
                local, local_test = split_own_data(local, cfg.data.local_test_fraction, cfg.seed)
        else:
            data = data if data is not None else build_federated_data(cfg.data, cfg.seed)
            model = copy.deepcopy(model) if model is not None else build_model(cfg, data)
        if callbacks is None:
            callbacks = CallbackManager(build_callbacks(cfg), strict=cfg.strict)
        learner = registry.build("learner", cfg.learner.model_dump(), "learner")
        learner.setup(model, callbacks)
        if cfg.privacy is not None and _trains_privately(cfg.privacy.type):
            privacy = registry.build("privacy", cfg.privacy.model_dump(), "privacy")
            learner.private_training = privacy.client_training()
        place = getattr(learner, "place", None)
        if place is not None:
            place(where, cfg.precision)
        elif where != CPU or cfg.precision != "32":
            raise ConfigError(f"{type(learner).__name__} has no place() (from oiafed's Learner) "
                              f"to train on {where} in precision {cfg.precision}", "learner.type")
        return cls(learner, None if local_data else data, local, resident=cfg.runtime.resident,
                   local_test=local_test)

    def client_data(self, client_id: str) -> ArrayDataset:
        """``client_id``'s local data, from the cache when it is there."""
        if self.local is not None:
            return self.local
        cached = self._cache.get(client_id)
        if cached is not None:
            self._cache.move_to_end(client_id)
            return cached
        assert self.data is not None
        data = self.data.client_data(client_id)
        size = _nbytes(data)
        if isinstance(self.data, FederatedData) and size <= DATA_CACHE_BYTES:
            if self.resident_on is not None:
                data = _moved(data, self.resident_on)
            self._cache[client_id] = data
            self._cache_bytes += size
            while self._cache_bytes > DATA_CACHE_BYTES:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= _nbytes(evicted)
        return data

    async def train(self, task: RoundTask, client: ClientTask) -> ClientUpdate:
        """Train ``client`` from ``task``; return its update, whose metrics hold ``time``: the
        seconds the learner's ``fit`` took (unless the learner put its own there)."""
        started = time.perf_counter()
        extras = {"tensors": {**task.extra_tensors, **client.extra_tensors},
                  "values": {**task.extra_values, **client.extra_values}}
        if extras["values"].get(TASK) == EVALUATE:
            return await self.evaluate(task, client, extras)
        if not (extras["tensors"] or extras["values"]):
            extras = {}  # a user's learner without the keywords still trains FedAvg
        update = await self.learner.fit(
            client.client_id, task.weights, self.client_data(client.client_id),
            round_num=task.round_num, seed=client.seed, config=task.config, **extras,
        )
        update.metrics.setdefault("time", time.perf_counter() - started)
        return update

    async def evaluate(self, task: RoundTask, client: ClientTask,
                       extras: dict[str, Any]) -> ClientUpdate:
        """``client``'s personal model evaluated on its local test set (``task`` is an
        evaluation round): an update of metrics only."""
        cid = client.client_id
        if self.data is not None:
            test = self.data.client_test_data(cid)
        elif self.local_test is not None:
            test = self.local_test
        else:
            raise ConfigError("personal evaluation needs local test sets, and this client "
                              "started without data.local_test_fraction",
                              "data.local_test_fraction")
        evaluate_personal = getattr(self.learner, "evaluate_personal", None)
        if evaluate_personal is None:
            raise ConfigError(f"{type(self.learner).__name__} has no evaluate_personal() (from "
                              "oiafed's Learner) for personal evaluation", "learner.type")
        update: ClientUpdate = await evaluate_personal(
            cid, task.weights, self.client_data(cid), test,
            round_num=task.round_num, seed=client.seed, config=task.config, **extras)
        return update

    def execute(self, round_data: bytes | bytearray | memoryview,
                client_data: bytes | bytearray | memoryview) -> TaskReply:
        """The entry point of workers in other processes: train the client ``client_data``
        names from the round ``round_data`` describes (both ``envelope`` bytes).

        The decoded round is kept while the same ``round_data`` object comes back (the
        round's clients share it). Whatever training raises becomes the reply's traceback.
        """
        try:
            if round_data is not self._round_data or self._round is None:
                self._round, self._round_data = decode_round(round_data), round_data
            client = decode_client(client_data)
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            update = self._loop.run_until_complete(self.train(self._round, client))
            return TaskReply(update=pack_update(update))
        except Exception:
            return TaskReply(traceback=traceback.format_exc())

    def close(self) -> None:
        """Release the worker's event loop."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None
