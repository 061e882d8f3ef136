"""Partitioners: disjoint and covering, deterministic per seed, the skew each one promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oiafed import registry
from oiafed.config import DataConfig
from oiafed.data.federated import FederatedData, FederatedSource, build_federated_data
from oiafed.data.leaf import LeafSynthetic
from oiafed.data.partition import IID, Dirichlet, Quantity, Shards
from oiafed.exceptions import ConfigError
from support import RegistrySnapshot

NUM_CLASSES = 10


def make_labels(n: int = 600, seed: int = 123, balanced: bool = False) -> np.ndarray:
    """``n`` labels over ten classes: uneven class sizes unless ``balanced``."""
    if balanced:
        return np.repeat(np.arange(NUM_CLASSES), n // NUM_CLASSES)
    gen = np.random.default_rng(seed)
    weights = np.linspace(1.0, 3.0, NUM_CLASSES)
    return gen.choice(NUM_CLASSES, size=n, p=weights / weights.sum())


def split(partitioner, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    return partitioner(labels, num_clients, np.random.default_rng(seed))


def assert_disjoint_covering(parts: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each part is sorted and has no repeats"
    joined = np.concatenate(parts)
    assert len(joined) == num_samples, "no sample is lost or given twice"
    assert np.array_equal(np.sort(joined), np.arange(num_samples))


def label_hist(labels: np.ndarray, part: np.ndarray) -> np.ndarray:
    return np.bincount(labels[part], minlength=NUM_CLASSES)


PARTITIONERS = {
    "iid": lambda: IID(),
    "dirichlet": lambda: Dirichlet(alpha=0.5, min_size=5),
    "dirichlet_skewed": lambda: Dirichlet(alpha=0.05, min_size=0),
    "shards": lambda: Shards(labels_per_client=2),
    "quantity": lambda: Quantity(alpha=0.5, min_size=3),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("num_clients", [1, 3, 10, 37])
@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_parts_are_disjoint_and_cover_the_pool(name: str, num_clients: int, seed: int) -> None:
    labels = make_labels(seed=seed)
    parts = split(PARTITIONERS[name](), labels, num_clients, seed)
    assert_disjoint_covering(parts, len(labels), num_clients)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_same_seed_same_parts_other_seed_other_parts(name: str) -> None:
    labels = make_labels()
    first = split(PARTITIONERS[name](), labels, 8, seed=5)
    again = split(PARTITIONERS[name](), labels, 8, seed=5)
    other = split(PARTITIONERS[name](), labels, 8, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_labels_are_mixed() -> None:
    labels = make_labels(n=1003)
    parts = split(IID(), labels, 10, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1003
    # 100 random samples out of ten classes: every client sees nearly every label.
    assert min(np.count_nonzero(label_hist(labels, p)) for p in parts) >= 8


def mean_distance_from_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of each client's label mix from the pool's."""
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    distances = []
    for part in parts:
        if len(part):
            mix = label_hist(labels, part) / len(part)
            distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = make_labels(n=2000)
    skew = {}
    for alpha in (100.0, 1.0, 0.1):
        skew[alpha] = np.mean([
            mean_distance_from_global(labels, split(Dirichlet(alpha, min_size=0), labels, 10, s))
            for s in range(5)
        ])
    assert skew[100.0] < 0.1, skew  # near IID
    assert skew[100.0] < skew[1.0] < skew[0.1], skew
    assert skew[0.1] > 0.5, skew  # most of a client's data is from few labels


def test_dirichlet_min_size_is_respected() -> None:
    labels = make_labels()
    for seed in range(5):
        parts = split(Dirichlet(alpha=0.1, min_size=25), labels, 10, seed)
        assert_disjoint_covering(parts, len(labels), 10)
        assert min(len(p) for p in parts) >= 25


def test_dirichlet_impossible_min_size_is_a_config_error() -> None:
    labels = make_labels(n=100)
    with pytest.raises(ConfigError, match=r"min_size=20 for 10 clients needs 200 samples.*has 100"):
        split(Dirichlet(alpha=1.0, min_size=20), labels, 10, seed=0)


def test_dirichlet_min_size_never_reached_is_a_config_error() -> None:
    # 10 x 59 <= 600, so the arithmetic allows it, but no Dirichlet(0.01) draw comes close.
    labels = make_labels(n=600)
    with pytest.raises(ConfigError, match=r"lower min_size or raise alpha"):
        split(Dirichlet(alpha=0.01, min_size=59), labels, 10, seed=0)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Dirichlet(alpha=0), "alpha must be > 0"),
        (lambda: Dirichlet(alpha=-1.0), "alpha must be > 0"),
        (lambda: Quantity(alpha=0), "alpha must be > 0"),
        (lambda: Shards(labels_per_client=0), "labels_per_client must be >= 1"),
    ],
)
def test_bad_arguments_are_config_errors(factory, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        factory()


@pytest.mark.parametrize("partitioner", [Dirichlet(min_size=-1), Quantity(min_size=-1)])
def test_negative_min_size_is_a_config_error(partitioner) -> None:
    with pytest.raises(ConfigError, match="min_size must be >= 0"):
        split(partitioner, make_labels(), 4, seed=0)


def test_shards_give_each_client_at_most_labels_per_client_labels() -> None:
    # Balanced classes, 600 samples, 20 clients x 2 shards of 15: shards never straddle labels.
    labels = make_labels(n=600, balanced=True)
    for seed in range(3):
        parts = split(Shards(labels_per_client=2), labels, 20, seed)
        assert_disjoint_covering(parts, len(labels), 20)
        assert all(np.count_nonzero(label_hist(labels, p)) <= 2 for p in parts)
        assert all(len(p) == 30 for p in parts)


@pytest.mark.parametrize("labels_per_client", [1, 2, 3])
def test_shards_limit_labels_for_most_clients_with_uneven_classes(labels_per_client: int) -> None:
    # Shards much smaller than a class (as in McMahan et al.): only the few shards that
    # straddle one of the nine label boundaries can add a label.
    labels = make_labels(n=1000)
    for seed in range(3):
        parts = split(Shards(labels_per_client=labels_per_client), labels, 50, seed)
        distinct = [np.count_nonzero(label_hist(labels, p)) for p in parts]
        within = sum(d <= labels_per_client for d in distinct)
        assert within >= len(parts) - 9, distinct
        # A shard can straddle one label boundary, so never more than twice the shards.
        assert max(distinct) <= 2 * labels_per_client, distinct


def test_shards_are_far_more_skewed_than_iid() -> None:
    labels = make_labels(n=1000)
    shards = split(Shards(labels_per_client=2), labels, 10, seed=0)
    iid = split(IID(), labels, 10, seed=0)
    assert mean_distance_from_global(labels, shards) > 3 * mean_distance_from_global(labels, iid)


def test_shards_need_enough_samples() -> None:
    with pytest.raises(ConfigError, match="needs at least 30 samples"):
        split(Shards(labels_per_client=3), make_labels(n=20), 10, seed=0)


def test_quantity_min_size_and_size_skew() -> None:
    labels = make_labels(n=1000)
    for seed in range(5):
        parts = split(Quantity(alpha=0.2, min_size=15), labels, 10, seed)
        assert min(len(p) for p in parts) >= 15

    def spread(alpha: float) -> float:
        sizes = [
            np.std([len(p) for p in split(Quantity(alpha, min_size=1), labels, 10, s)])
            for s in range(5)
        ]
        return float(np.mean(sizes))

    assert spread(0.1) > spread(1.0) > spread(100.0)


def test_quantity_impossible_min_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_size=11 for 10 clients needs 110"):
        split(Quantity(min_size=11), make_labels(n=100), 10, seed=0)


def test_partitioners_are_registered_and_built_from_config() -> None:
    assert {"partitioner.iid", "partitioner.dirichlet", "partitioner.shards",
            "partitioner.quantity"} <= set(registry.names("partitioner"))
    built = registry.build("partitioner", {"type": "dirichlet", "args": {"alpha": 0.3, "min_size": 2}})
    assert isinstance(built, Dirichlet)
    assert (built.alpha, built.min_size) == (0.3, 2)


# -- through build_federated_data -------------------------------------------------------------


def federated(seed: int = 0, **data: object):
    cfg = DataConfig.model_validate({"type": "digits", "num_clients": 5, **data})
    return build_federated_data(cfg, seed)


@pytest.mark.parametrize("partition", [
    {"type": "iid"},
    {"type": "dirichlet", "args": {"alpha": 0.3, "min_size": 10}},
    {"type": "shards", "args": {"labels_per_client": 2}},
    {"type": "quantity", "args": {"alpha": 0.5, "min_size": 10}},
])
def test_federated_data_test_split_is_stratified_and_report_sums_to_pool(partition: dict) -> None:
    fed = federated(partition=partition, test_fraction=0.25)
    pool_counts = np.array(fed.train.label_counts()) + np.array(fed.test.label_counts())
    assert pool_counts.sum() == 1797  # the digits pool, split in two without loss
    # Stratified: every class is in the test set in (almost exactly) the pool's proportion.
    expected = pool_counts * 0.25
    assert np.all(np.abs(np.array(fed.test.label_counts()) - expected) <= 1.0)

    report = fed.report()
    clients = report["clients"]
    assert list(clients) == fed.client_ids == [f"client_{i}" for i in range(5)]
    assert report["train_samples"] == len(fed.train)
    assert report["test_samples"] == len(fed.test) == math.ceil(1797 * 0.25)
    assert sum(c["num_samples"] for c in clients.values()) == len(fed.train)
    summed = np.sum([c["label_counts"] for c in clients.values()], axis=0)
    assert summed.tolist() == fed.train.label_counts()
    for cid, entry in clients.items():
        local = fed.client_data(cid)
        assert len(local) == entry["num_samples"]
        assert local.label_counts() == entry["label_counts"]


def test_federated_data_is_deterministic_per_seed() -> None:
    partition = {"type": "dirichlet", "args": {"alpha": 0.5}}
    first = federated(1, partition=partition)
    again = federated(1, partition=partition)
    other = federated(2, partition=partition)
    assert first.report() == again.report()
    assert torch.equal(first.test.y, again.test.y)
    assert all(np.array_equal(a, b) for a, b in zip(first.parts, again.parts, strict=True))
    assert first.report()["clients"] != other.report()["clients"]
    assert not torch.equal(first.test.y, other.test.y)


def test_federated_impossible_min_size_names_the_partition_args() -> None:
    with pytest.raises(ConfigError) as info:
        federated(partition={"type": "dirichlet", "args": {"min_size": 1000}})
    assert info.value.path == "data.partition.args"
    assert "min_size=1000" in str(info.value)


def test_federated_too_many_clients_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        federated(num_clients=5000)
    assert info.value.path == "data.num_clients"


def test_federated_bad_partition_value_names_its_section() -> None:
    with pytest.raises(ConfigError, match=r"data\.partition\.args: alpha must be > 0"):
        federated(partition={"type": "dirichlet", "args": {"alpha": 0}})


# -- on-demand sources through build_federated_data ---------------------------------------------


def synthetic_data(seed: int = 0, **data: object):
    cfg = DataConfig.model_validate({"type": "synthetic", "num_clients": 1000, **data})
    return build_federated_data(cfg, seed)


def test_pooled_and_on_demand_data_offer_the_same_surface() -> None:
    pooled, on_demand = federated(), synthetic_data(args={"num_features": 64, "shape": [1, 8, 8]})
    for source in (pooled, on_demand):
        assert isinstance(source, FederatedSource)
        cid = source.client_ids[-1]
        assert source.index_of(cid) == len(source.client_ids) - 1
        assert source.client_data(cid).input_shape == source.input_shape == (1, 8, 8)
        assert source.num_classes == 10 and len(source.test) > 0
        assert source.report()["num_clients"] == source.num_clients
    assert isinstance(pooled, FederatedData) and isinstance(on_demand, LeafSynthetic)


def test_on_demand_data_gets_num_clients_test_fraction_and_seed_injected() -> None:
    source = synthetic_data(7, num_clients=321, test_fraction=0.5,
                            args={"samples_per_client": 10})
    assert source.num_clients == 321 and source.seed == 7
    assert len(source.client_data("client_320")) == 5
    assert len(source.test) == 100 * 5  # 100 test clients by default


@pytest.mark.parametrize("partition", [
    {"type": "dirichlet", "args": {"alpha": 0.3}},
    {"type": "shards"},
    {"type": "iid", "args": {"bogus": 1}},
])
def test_on_demand_data_rejects_a_partition(partition: dict) -> None:
    with pytest.raises(ConfigError) as info:
        synthetic_data(partition=partition)
    assert info.value.path == "data.partition"
    assert "takes no partition" in str(info.value)


def test_on_demand_data_accepts_the_default_partition_written_out() -> None:
    # A resolved config (config.yaml) spells the default out; resuming it must work.
    assert synthetic_data(partition={"type": "iid"}).num_clients == 1000


def test_a_dataset_returning_something_else_is_a_config_error() -> None:
    with RegistrySnapshot():
        registry.register("dataset.broken")(lambda seed: [1, 2, 3])
        with pytest.raises(ConfigError, match="returned list") as info:
            build_federated_data(DataConfig.model_validate({"type": "broken"}), 0)
    assert info.value.path == "data.type"


def test_a_user_source_with_the_wrong_client_count_is_a_config_error() -> None:
    with RegistrySnapshot():
        registry.register("dataset.fixed")(lambda seed: LeafSynthetic(seed, 5))
        with pytest.raises(ConfigError, match=r"5 clients but data\.num_clients is 10") as info:
            build_federated_data(DataConfig.model_validate({"type": "fixed"}), 0)
    assert info.value.path == "data.num_clients"
