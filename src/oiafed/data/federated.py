"""The federation's data: a held-out global test set and each client's local data.

A dataset component returns either

* a pooled ``ArrayDataset``: oiafed splits off the global test set (``data.test_fraction``,
  stratified) and partitions the rest among ``data.num_clients`` clients with
  ``data.partition`` (a ``FederatedData``);
* a ``TrainTest`` pair, for a dataset with an official test set (``mnist``): that set is the
  global test set and the training set alone is partitioned (``data.test_set: split`` pools
  both and splits as above); or
* a ``FederatedSource`` of its own, which gives each client its data on demand (``synthetic``
  does): nothing is held per client, so a federation of 100,000 clients costs what its
  sampled clients cost. Such a dataset declares ``num_clients`` (and ``test_fraction``) among
  its arguments to have them injected, and takes no ``data.partition``.

Trainer, runtimes and workers use only the ``FederatedSource`` surface.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Container, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from oiafed import registry
from oiafed.data.arrays import ArrayDataset, TrainTest
from oiafed.data.local_test import split_local_tests
from oiafed.exceptions import ConfigError
from oiafed.seeding import LOCAL_TEST, PARTITION, derive_seed, rng

if TYPE_CHECKING:
    from oiafed.config import DataConfig

PREFIX = "client_"
MAX_CLIENTS = 2**53
"""The most clients a federation may have: client indices stay exact in float64 (the test
clients' ``linspace``) and ``len()`` fits in a C ``ssize_t``."""


def client_id(index: int) -> str:
    """The id of the client at ``index``: ``client_0``, ``client_1``, ..."""
    return f"{PREFIX}{index}"


class ClientIds(Sequence[str]):
    """``client_0 .. client_{n-1}`` as a sequence that stores nothing per client.

    Indexing, ``in`` and ``index()`` are O(1), so a source of any size needs no id list.
    """

    __slots__ = ("_n",)

    def __init__(self, num_clients: int) -> None:
        if not 0 <= num_clients <= MAX_CLIENTS:
            raise ValueError(f"num_clients must be in [0, {MAX_CLIENTS}], got {num_clients}")
        self._n = num_clients

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [client_id(j) for j in range(*i.indices(self._n))]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"client index {i} out of range for {self._n} clients")
        return client_id(j)

    def __iter__(self) -> Iterator[str]:
        return (client_id(j) for j in range(self._n))

    def __contains__(self, cid: object) -> bool:
        return self._parse(cid) is not None

    def index(self, cid: Any, start: int = 0, stop: int | None = None) -> int:
        """The index of ``cid`` (``ValueError`` if it is not one of these ids)."""
        j = self._parse(cid)
        stop = self._n if stop is None else stop
        if j is None or not start <= j < stop:
            raise ValueError(f"{cid!r} is not in the client ids")
        return j

    def _parse(self, cid: object) -> int | None:
        if not isinstance(cid, str) or not cid.startswith(PREFIX):
            return None
        digits = cid[len(PREFIX):]
        if not (digits.isascii() and digits.isdigit()) or (len(digits) > 1 and digits[0] == "0"):
            return None
        j = int(digits)
        return j if j < self._n else None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClientIds):
            return self._n == other._n
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == self._n and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return f"ClientIds({self._n})"


def id_set(client_ids: Sequence[str]) -> Container[str]:
    """``client_ids`` for O(1) ``in`` tests: ``ClientIds`` as they are (nothing stored per
    client), any other sequence as a frozenset."""
    return client_ids if isinstance(client_ids, ClientIds) else frozenset(client_ids)


class FederatedSource(ABC):
    """The federation's data, as the trainer, runtimes and workers see it.

    Attributes:
        client_ids: every client's id, in index order (``client_0``, ``client_1``, ...).
        test: the global test set (bounded in size: the trainer evaluates on it every round).
        num_classes, input_shape: what models are built for.

    Nothing here may cost O(number of clients) per call: ``index_of``, ``client_data`` and
    ``client_size`` are called for the sampled clients of every round.
    """

    client_ids: Sequence[str]
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def num_clients(self) -> int:
        """How many clients the federation has."""
        return len(self.client_ids)

    @abstractmethod
    def index_of(self, cid: str) -> int:
        """The index of client ``cid`` (its position in ``client_ids``); ``KeyError`` if unknown."""

    @abstractmethod
    def client_data(self, cid: str) -> ArrayDataset:
        """Client ``cid``'s local training data."""

    def client_size(self, cid: str) -> int:
        """How many training samples client ``cid`` has: what an honest update of its declares
        as ``num_samples`` (the trainer checks). This default builds the client's data; a
        source that knows sizes cheaply overrides it (called per sampled client per round)."""
        return len(self.client_data(cid))

    def client_test_data(self, cid: str) -> ArrayDataset:
        """Client ``cid``'s local test set (``data.local_test_fraction``), on which its
        personal model is evaluated.

        Raises:
            ConfigError: naming ``data.local_test_fraction`` where clients have none.
        """
        raise ConfigError(f"{type(self).__name__} holds no local test sets: set "
                          "data.local_test_fraction > 0 (a pooled dataset)",
                          "data.local_test_fraction")

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """What ``partition.json`` records: sizes and label histograms, as far as they are cheap."""


class FederatedData(FederatedSource):
    """A pooled dataset split once from the seed: global test split plus one partition per client.

    Attributes:
        train: the training pool the partitions index into.
        parts: one sorted index array into ``train`` per client.
        local_tests: one sorted index array into ``train`` per client: its local test set,
            apart from its part (None: clients have none).
    """

    def __init__(self, train: ArrayDataset, test: ArrayDataset, parts: list[np.ndarray],
                 local_tests: list[np.ndarray] | None = None) -> None:
        self.train = train
        self.test = test
        self.parts = parts
        self.local_tests = local_tests
        self.client_ids = ClientIds(len(parts))
        self.num_classes = train.num_classes
        self.input_shape = train.input_shape

    def index_of(self, cid: str) -> int:
        try:
            return self.client_ids.index(cid)
        except ValueError:
            raise KeyError(f"unknown client id {cid!r}") from None

    def client_data(self, cid: str) -> ArrayDataset:
        return self.train.subset(self.parts[self.index_of(cid)])

    def client_size(self, cid: str) -> int:
        return len(self.parts[self.index_of(cid)])

    def client_test_data(self, cid: str) -> ArrayDataset:
        if self.local_tests is None:
            return super().client_test_data(cid)
        return self.train.subset(self.local_tests[self.index_of(cid)])

    def report(self) -> dict[str, Any]:
        """Per-client sample counts and label histograms, and the test split's histogram."""
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


OPTIONAL_INJECTED = ("num_clients", "test_fraction")
"""``data`` fields a dataset receives as arguments when its signature names them."""


def _declared(target: Any) -> set[str]:
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()


def build_federated_data(data_cfg: DataConfig, seed: int) -> FederatedSource:
    """Build the configured dataset; a pooled one is split into test set and client partitions.

    Raises:
        ConfigError: on bad data settings, naming the key path (``data.partition`` when an
            on-demand dataset is given a partition, ``data.num_clients`` above ``MAX_CLIENTS``).
    """
    if data_cfg.num_clients > MAX_CLIENTS:
        raise ConfigError(
            f"{data_cfg.num_clients} clients is more than a federation can have: at most "
            f"2**53 = {MAX_CLIENTS} (client indices must stay exact)", "data.num_clients")
    target = registry.get("dataset", data_cfg.type, path="data.type")
    declared = _declared(target)
    injected: dict[str, Any] = {"seed": seed}
    injected.update({name: getattr(data_cfg, name) for name in OPTIONAL_INJECTED
                     if name in declared})
    built = registry.build("dataset", {"type": data_cfg.type, "args": data_cfg.args}, "data",
                           **injected)
    if isinstance(built, FederatedSource):
        return _check_source(built, data_cfg)
    if isinstance(built, ArrayDataset | TrainTest):
        return _split_pool(built, data_cfg, seed)
    raise ConfigError(
        f"dataset {data_cfg.type!r} returned {type(built).__name__}; a dataset returns an "
        "ArrayDataset (pooled), a TrainTest (official test set) or a FederatedSource "
        "(per-client data)", "data.type")


def _check_source(source: FederatedSource, data_cfg: DataConfig) -> FederatedSource:
    if data_cfg.partition != type(data_cfg.partition)():
        raise ConfigError(
            f"dataset {data_cfg.type!r} gives every client its own data, so it takes no "
            "partition; remove data.partition", "data.partition")
    if data_cfg.local_test_fraction > 0:
        raise ConfigError(f"dataset {data_cfg.type!r} gives every client its own data; local "
                          "test sets are split from a pooled dataset's partitions: remove "
                          "data.local_test_fraction", "data.local_test_fraction")
    if data_cfg.test_set == "official":
        raise ConfigError(f"dataset {data_cfg.type!r} makes its own test set, it has no official "
                          "one; remove data.test_set", "data.test_set")
    if source.num_clients != data_cfg.num_clients:
        raise ConfigError(f"dataset {data_cfg.type!r} has {source.num_clients} clients but "
                          f"data.num_clients is {data_cfg.num_clients}", "data.num_clients")
    if len(source.test) == 0:
        raise ConfigError(f"dataset {data_cfg.type!r} gives an empty test set", "data")
    return source


def _split_pool(pool: ArrayDataset | TrainTest, data_cfg: DataConfig, seed: int) -> FederatedData:
    """Take the global test set (``data.test_set``) and partition the rest among the clients."""
    train, test = _test_split(pool, data_cfg, seed)
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
    local_tests = None
    if data_cfg.local_test_fraction > 0:
        parts, local_tests = split_local_tests(parts, train.y.numpy(),
                                               data_cfg.local_test_fraction, rng(seed, LOCAL_TEST))
    return FederatedData(train, test, parts, local_tests)


def _test_split(pool: ArrayDataset | TrainTest, data_cfg: DataConfig,
                seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(training pool, global test set): the dataset's official test set, or a stratified
    ``data.test_fraction`` of all its samples pooled."""
    if isinstance(pool, TrainTest):
        if data_cfg.test_set != "split":
            return pool.train, pool.test
        pool = pool.pooled()
    elif data_cfg.test_set == "official":
        raise ConfigError(f"dataset {data_cfg.type!r} has no official test set; use "
                          "data.test_set: split (or auto)", "data.test_set")
    from sklearn.model_selection import train_test_split  # heavy: imported on first use

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
    return pool.subset(np.sort(train_idx)), pool.subset(np.sort(test_idx))


def _check_partition(parts: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    """A partition must give one part per client, disjoint and covering the pool."""
    if len(parts) != num_clients:
        raise ConfigError(f"partitioner returned {len(parts)} parts for {num_clients} clients",
                          "data.partition")
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if len(joined) != num_samples or not np.array_equal(np.sort(joined), np.arange(num_samples)):
        raise ConfigError("partitioner's parts are not disjoint and covering", "data.partition")
