"""The FedAvg paper's setting (McMahan et al., AISTATS 2017): MNIST's official test set, the
paper's CNN and 2NN, its IID and pathological non-IID partitions, the example configs, and the
benchmark's hand-written reference loop (checked to be FedAvg)."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import struct
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import oiafed
from oiafed.config import load_config
from oiafed.data.federated import FederatedData, build_federated_data
from oiafed.exceptions import ConfigError
from oiafed.models import fedavg_2nn, fedavg_cnn

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason=f"real MNIST not found at {MNIST_DIR} (the shared data folder is absent)")


def idx(array: np.ndarray) -> bytes:
    """``array`` (unsigned bytes) as an IDX file."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + b"".join(struct.pack(">I", n) for n in array.shape) + \
        array.astype(np.uint8).tobytes()


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """A folder of MNIST-format files: 40 training images (4 per digit), 7 test images."""
    gen = np.random.default_rng(0)
    parts = {"train": np.repeat(np.arange(10), 4), "t10k": np.array([3, 1, 4, 1, 5, 9, 2])}
    for prefix, labels in parts.items():
        images = gen.integers(0, 256, size=(len(labels), 28, 28))
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(labels)))
    return tmp_path


def federation(root: Path, **data: object) -> FederatedData:
    cfg = load_config({"data": {"type": "mnist", "args": {"root": str(root)}, **data}})
    built = build_federated_data(cfg.data, seed=0)
    assert isinstance(built, FederatedData)
    return built


# -- the official test set ------------------------------------------------------------------


def test_mnist_official_test_set_is_the_default_and_split_pools_both(fake_mnist: Path) -> None:
    for test_set in ("auto", "official"):
        data = federation(fake_mnist, num_clients=4, test_set=test_set)
        assert data.test.y.tolist() == [3, 1, 4, 1, 5, 9, 2]
        assert len(data.train) == 40
        assert sum(data.client_size(cid) for cid in data.client_ids) == 40
    pooled = federation(fake_mnist, num_clients=4, test_set="split", test_fraction=0.2)
    assert len(pooled.train) + len(pooled.test) == 47
    assert len(pooled.test) == 10  # ceil(0.2 * 47), stratified from both parts


@needs_mnist
def test_real_mnist_partitions_60000_training_images_and_tests_on_the_10000() -> None:
    data = federation(MNIST_DIR, num_clients=100, partition={"type": "iid"})
    assert len(data.test) == 10_000
    assert data.test.label_counts() == MNIST_TEST_COUNTS
    assert len(data.train) == 60_000
    assert data.train.label_counts() == MNIST_TRAIN_COUNTS
    assert [data.client_size(cid) for cid in data.client_ids] == [600] * 100
    joined = np.concatenate(data.parts)
    assert np.array_equal(np.sort(joined), np.arange(60_000))


@needs_mnist
def test_real_mnist_pathological_partition_is_two_label_sorted_shards_of_300() -> None:
    data = federation(MNIST_DIR, num_clients=100,
                      partition={"type": "shards", "args": {"labels_per_client": 2}})
    labels = data.train.y.numpy()
    ordered = np.sort(labels)
    windows = Counter(tuple(np.bincount(ordered[300 * k:300 * (k + 1)], minlength=10))
                      for k in range(200))
    halves: Counter[tuple[int, ...]] = Counter()
    distinct = []
    for part in data.parts:
        assert len(part) == 600
        own = np.sort(labels[part])  # two windows of the sorted labels: the lower one first
        halves.update(tuple(np.bincount(h, minlength=10)) for h in (own[:300], own[300:]))
        distinct.append(len(set(own.tolist())))
    assert halves == windows  # the 200 halves are the 200 shards of 300, each used once
    # At most 9 shards straddle two digits (one per digit boundary); only their owners may
    # see more than two digits, and then at most four.
    assert max(distinct) <= 4
    assert sum(d > 2 for d in distinct) <= 9


# -- the paper's models ---------------------------------------------------------------------


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_models_have_the_papers_parameter_counts_and_body_head() -> None:
    cnn, two_nn = fedavg_cnn((1, 28, 28), 10), fedavg_2nn((1, 28, 28), 10)
    assert count(cnn) == 1_663_370
    assert count(two_nn) == 199_210
    assert list(cnn.state_dict()) == [
        "body.conv1.weight", "body.conv1.bias", "body.conv2.weight", "body.conv2.bias",
        "body.fc.weight", "body.fc.bias", "head.weight", "head.bias"]
    assert list(two_nn.state_dict()) == [
        "body.fc1.weight", "body.fc1.bias", "body.fc2.weight", "body.fc2.bias",
        "head.weight", "head.bias"]
    x = torch.rand(3, 1, 28, 28)
    for model in (cnn, two_nn):
        assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
        assert torch.equal(model(x), model.head(model.body(x)))


def test_fedavg_cnn_refuses_non_image_input() -> None:
    with pytest.raises(ConfigError, match=r"model\.type: fedavg_cnn needs image input"):
        fedavg_cnn((64,), 10)
    with pytest.raises(ConfigError, match="at least 4 x 4"):
        fedavg_cnn((1, 3, 3), 10)


# -- bad configs ----------------------------------------------------------------------------


def test_bad_test_set_values_name_the_key(fake_mnist: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.test_set"):
        load_config({"data": {"type": "mnist", "test_set": "official-ish"}})
    with pytest.raises(ConfigError, match=r"data\.test_set: dataset 'digits' has no official"):
        build_federated_data(load_config({"data": {"test_set": "official"}}).data, seed=0)
    synthetic = {"type": "synthetic", "num_clients": 3, "test_set": "official"}
    with pytest.raises(ConfigError, match=r"data\.test_set: dataset 'synthetic' makes its own"):
        build_federated_data(load_config({"data": synthetic}).data, seed=0)
    with pytest.raises(ConfigError, match="split must be one of official, train, test, all"):
        federation(fake_mnist, num_clients=2, args={"root": str(fake_mnist), "split": "val"})
    with pytest.raises(ConfigError, match=r"data\.args\.root: no train-images-idx3-ubyte"):
        federation(fake_mnist / "nowhere", num_clients=2)


# -- the example configs --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg_mnist_iid", "fedavg_mnist_noniid"])
def test_examples_are_the_papers_setting_and_run(fake_mnist: Path, tmp_path: Path,
                                                 name: str) -> None:
    path = REPO / "examples" / f"{name}.yaml"
    cfg = load_config(path)
    assert (cfg.data.type, cfg.data.num_clients, cfg.data.test_set) == ("mnist", 100, "official")
    assert cfg.model.type == "fedavg_cnn"
    assert cfg.trainer.args["fraction"] == 0.1
    assert {k: cfg.learner.args[k] for k in ("epochs", "batch_size", "optimizer", "momentum")} \
        == {"epochs": 5, "batch_size": 10, "optimizer": "sgd", "momentum": 0.0}
    assert cfg.aggregator.type == "fedavg"
    result = oiafed.run(path, run_dir=tmp_path / "run", overrides={
        "data.args.root": str(fake_mnist), "data.num_clients": 4, "trainer.args.rounds": 1,
        "trainer.args.fraction": 0.5, "learner.args.epochs": 1})
    assert result.rounds_completed == 1
    report = (tmp_path / "run" / "partition.json").read_text()
    assert '"test_samples": 7' in report and '"train_samples": 40' in report


# -- the benchmark's reference loop is FedAvg -----------------------------------------------


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedavg_mnist_bench",
                                                  REPO / "benchmarks" / "fedavg_mnist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def sgd_from(start: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
             generator: torch.Generator, lr: float, epochs: int,
             batch: int) -> dict[str, torch.Tensor]:
    """A client trained from its own copy of ``start`` with SGD written out (w -= lr * grad)."""
    model = tiny_model()
    model.load_state_dict(copy.deepcopy(start))
    params = dict(model.named_parameters())
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for first in range(0, len(y), batch):
            index = order[first:first + batch]
            loss = F.cross_entropy(model(x[index]), y[index])
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for param, grad in zip(params.values(), grads, strict=True):
                    param.sub_(lr * grad)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reference_loop_round_is_the_weighted_mean_of_clients_from_the_same_start(
        bench: ModuleType) -> None:
    gen = torch.Generator().manual_seed(1)
    sizes = [7, 12, 9, 15, 10, 8]
    clients = [(torch.rand(n, 1, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
               for n in sizes]
    test = (torch.rand(20, 1, 4, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    loop = bench.PlainFedAvg(clients, test, lr=0.5, seed=3, model_fn=tiny_model, epochs=2,
                             batch_size=4, clients_per_round=3)
    loop.round()  # the second round starts from a trained global model
    start = copy.deepcopy(loop.global_weights)
    before = loop.generator.get_state()
    order = torch.Generator()
    order.set_state(before)
    result = loop.round()
    chosen = result["clients"]
    assert len(set(chosen)) == 3

    independent = [sgd_from(start, *clients[c], generator=order, lr=0.5, epochs=2, batch=4)
                   for c in chosen]
    weights = np.array([sizes[c] for c in chosen], dtype=np.float64)
    for name, value in loop.global_weights.items():
        stacked = np.stack([w[name].double().numpy() for w in independent])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-5, atol=1e-6)

    # The check tells FedAvg from clients trained one after another (each from the last one's
    # weights), which a loop that shares its parameters with the global vector would do.
    order.set_state(before)
    chained, sequential = start, []
    for c in chosen:
        chained = sgd_from(chained, *clients[c], generator=order, lr=0.5, epochs=2, batch=4)
        sequential.append(chained)
    mean = bench.weighted_mean(sequential, [sizes[c] for c in chosen])
    assert not all(torch.allclose(mean[k], loop.global_weights[k], atol=1e-3) for k in mean)


def test_reference_loop_model_is_the_papers_cnn(bench: ModuleType) -> None:
    assert count(bench.paper_cnn()) == 1_663_370
