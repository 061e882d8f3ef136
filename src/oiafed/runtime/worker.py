"""What local training needs, built from the config alone, in whatever process runs it.

Every runtime trains clients through a ``ClientWorker``: in this process (serial), in worker
processes (parallel), in Ray actors or in gRPC client processes. A remote worker is rebuilt
from the config (registry names + args), never from pickled objects; partitions, model
initialisation and data order come from the seed, so every worker agrees.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from oiafed import registry
from oiafed.callbacks.base import CallbackManager
from oiafed.config import ExperimentConfig
from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, Weights
from oiafed.data.arrays import ArrayDataset
from oiafed.data.federated import FederatedData, FederatedSource, build_federated_data
from oiafed.seeding import INIT, TRAIN, derive_seed


def build_model(cfg: ExperimentConfig, data: FederatedSource) -> nn.Module:
    """The configured model, initialised from the seed (without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, INIT))
        return registry.build("model", cfg.model.model_dump(), "model",
                              input_shape=data.input_shape, num_classes=data.num_classes)


def build_callbacks(cfg: ExperimentConfig) -> list[Any]:
    """The configured callbacks, in config order."""
    return [registry.build("callback", section.model_dump(), f"callbacks[{i}]")
            for i, section in enumerate(cfg.callbacks)]


DATA_CACHE_BYTES = 256 * 2**20
"""Clients' local datasets kept between rounds by one worker (least recently used go first)."""


def _nbytes(data: ArrayDataset) -> int:
    return data.x.nelement() * data.x.element_size() + data.y.nelement() * data.y.element_size()


class ClientWorker:
    """Trains any client of the federation with one reusable ``Learner`` (and model).

    For a partitioned pool, recently trained clients' datasets stay cached (up to
    ``DATA_CACHE_BYTES`` in all), so nothing is copied again for a client sampled again;
    on-demand sources keep their own bounded cache.
    """

    def __init__(self, learner: Learner, data: FederatedSource, seed: int) -> None:
        self.learner = learner
        self.data = data
        self.seed = seed
        self._cache: OrderedDict[str, ArrayDataset] = OrderedDict()
        self._cache_bytes = 0

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        *,
        callbacks: CallbackManager | None = None,
        data: FederatedSource | None = None,
        model: nn.Module | None = None,
    ) -> ClientWorker:
        """Build a worker; without ``callbacks`` it builds the configured ones itself."""
        registry.import_modules(cfg.imports)
        data = data if data is not None else build_federated_data(cfg.data, cfg.seed)
        model = copy.deepcopy(model) if model is not None else build_model(cfg, data)
        if callbacks is None:
            callbacks = CallbackManager(build_callbacks(cfg), strict=cfg.strict)
        learner = registry.build("learner", cfg.learner.model_dump(), "learner")
        learner.setup(model, callbacks)
        return cls(learner, data, cfg.seed)

    def client_data(self, client_id: str) -> ArrayDataset:
        """``client_id``'s local data, from the cache when it is there."""
        cached = self._cache.get(client_id)
        if cached is not None:
            self._cache.move_to_end(client_id)
            return cached
        data = self.data.client_data(client_id)
        size = _nbytes(data)
        if isinstance(self.data, FederatedData) and size <= DATA_CACHE_BYTES:
            self._cache[client_id] = data
            self._cache_bytes += size
            while self._cache_bytes > DATA_CACHE_BYTES:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= _nbytes(evicted)
        return data

    def client_seed(self, client_id: str, round_num: int) -> int:
        """The seed of ``client_id``'s local training in ``round_num``."""
        return derive_seed(self.seed, TRAIN, round_num, self.data.index_of(client_id))

    async def train(
        self, client_id: str, weights: Weights, round_num: int, config: dict[str, Any]
    ) -> ClientUpdate:
        """Train ``client_id`` from ``weights`` for ``round_num``; return its update."""
        return await self.learner.fit(
            client_id, weights, self.client_data(client_id),
            round_num=round_num, seed=self.client_seed(client_id, round_num), config=config,
        )
