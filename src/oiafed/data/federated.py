"""The federation's data: a held-out global test set and one partition per client."""

from __future__ import annotations

from typing import Any

import numpy as np

from oiafed import registry
from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import ConfigError
from oiafed.seeding import PARTITION, derive_seed, rng


def client_id(index: int) -> str:
    """The id of the client at ``index``: ``client_0``, ``client_1``, ..."""
    return f"client_{index}"


class FederatedData:
    """Global test split plus per-client training partitions, computed once from the seed.

    Attributes:
        test: the global test set.
        client_ids: every client's id, in index order.
        num_classes, input_shape: what models are built for.
    """

    def __init__(self, train: ArrayDataset, test: ArrayDataset, parts: list[np.ndarray]) -> None:
        self.train = train
        self.test = test
        self.parts = parts
        self.client_ids = [client_id(i) for i in range(len(parts))]
        self._index = {cid: i for i, cid in enumerate(self.client_ids)}
        self.num_classes = train.num_classes
        self.input_shape = train.input_shape

    def index_of(self, cid: str) -> int:
        """The index of client ``cid`` (its position in ``client_ids``)."""
        try:
            return self._index[cid]
        except KeyError:
            raise KeyError(f"unknown client id {cid!r}") from None

    def client_data(self, cid: str) -> ArrayDataset:
        """Client ``cid``'s local training data."""
        return self.train.subset(self.parts[self.index_of(cid)])

    def report(self) -> dict[str, Any]:
        """Per-client sample counts and label histograms (for ``partition.json``)."""
        labels = self.train.y.numpy()
        clients = {
            cid: {
                "num_samples": len(part),
                "label_counts": np.bincount(labels[part], minlength=self.num_classes).tolist(),
            }
            for cid, part in zip(self.client_ids, self.parts, strict=True)
        }
        return {
            "num_clients": len(self.parts),
            "num_classes": self.num_classes,
            "train_samples": len(self.train),
            "test_samples": len(self.test),
            "test_label_counts": self.test.label_counts(),
            "clients": clients,
        }


def build_federated_data(data_cfg: Any, seed: int) -> FederatedData:
    """Load the configured dataset, split off the test set, and partition the rest."""
    from sklearn.model_selection import train_test_split  # heavy: imported on first use

    pool = registry.build("dataset", {"type": data_cfg.type, "args": data_cfg.args}, "data",
                          seed=seed)
    labels = pool.y.numpy()
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(pool)), test_size=data_cfg.test_fraction, stratify=stratify,
            random_state=derive_seed(seed, PARTITION) % (2**32),
        )
    except ValueError as exc:
        raise ConfigError(str(exc), "data.test_fraction") from exc
    train, test = pool.subset(np.sort(train_idx)), pool.subset(np.sort(test_idx))
    if data_cfg.num_clients > len(train):
        raise ConfigError(
            f"{data_cfg.num_clients} clients but only {len(train)} training samples",
            "data.num_clients",
        )
    partitioner = registry.build("partitioner", data_cfg.partition.model_dump(), "data.partition")
    try:
        parts = partitioner(train.y.numpy(), data_cfg.num_clients, rng(seed, PARTITION))
    except ConfigError as exc:
        if exc.path:
            raise
        raise ConfigError(str(exc), "data.partition.args") from exc
    _check_partition(parts, len(train), data_cfg.num_clients)
    return FederatedData(train, test, parts)


def _check_partition(parts: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    """A partition must give one part per client, disjoint and covering the pool."""
    if len(parts) != num_clients:
        raise ConfigError(f"partitioner returned {len(parts)} parts for {num_clients} clients",
                          "data.partition")
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if len(joined) != num_samples or not np.array_equal(np.sort(joined), np.arange(num_samples)):
        raise ConfigError("partitioner's parts are not disjoint and covering", "data.partition")
