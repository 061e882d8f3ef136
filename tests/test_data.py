"""Built-in datasets: digits, LEAF synthetic (on demand), and the MNIST IDX loader (real files
and broken ones)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from oiafed import registry
from oiafed.data.arrays import ArrayDataset
from oiafed.data.datasets import digits, mnist, synthetic
from oiafed.data.federated import ClientIds, FederatedSource
from oiafed.exceptions import ConfigError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared/data/mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# -- digits -------------------------------------------------------------------------------------


def test_digits_are_1x8x8_images_in_unit_range_with_ten_classes() -> None:
    data = digits(seed=0)
    assert isinstance(data, ArrayDataset)
    assert data.x.shape == (1797, 1, 8, 8)
    assert data.input_shape == (1, 8, 8)
    assert data.x.dtype == torch.float32
    assert data.y.dtype == torch.int64
    assert float(data.x.min()) == 0.0
    assert float(data.x.max()) == 1.0
    assert data.num_classes == 10
    assert sorted(set(data.y.tolist())) == list(range(10))
    assert sum(data.label_counts()) == 1797


def test_digits_flatten_gives_64_features_of_the_same_images() -> None:
    images, flat = digits(seed=0), digits(seed=0, flatten=True)
    assert flat.x.shape == (1797, 64)
    assert torch.equal(flat.x, images.x.reshape(1797, 64))
    assert torch.equal(flat.y, images.y)


# -- synthetic (LEAF Synthetic(alpha, beta), generated per client) ------------------------------


def test_synthetic_is_an_on_demand_source_with_the_requested_shapes() -> None:
    source = synthetic(seed=0, num_clients=20, samples_per_client=30, num_features=7,
                       num_classes=4)
    assert isinstance(source, FederatedSource)
    assert (source.num_clients, source.num_classes, source.input_shape) == (20, 4, (7,))
    assert list(source.client_ids) == [f"client_{i}" for i in range(20)]
    local = source.client_data("client_3")
    assert isinstance(local, ArrayDataset)
    assert local.x.shape == (24, 7)  # 30 generated, round(0.2 x 30) = 6 held out
    assert local.x.dtype == torch.float32 and local.y.dtype == torch.int64
    assert set(local.y.tolist()) <= {0, 1, 2, 3}
    assert source.test.x.shape == (20 * 6, 7)  # every client's held-out part (20 <= 100)
    assert sum(source.test.label_counts()) == 120


def test_synthetic_shape_gives_image_samples() -> None:
    source = synthetic(seed=0, num_clients=3, num_features=64, shape=[1, 8, 8])
    assert source.input_shape == (1, 8, 8)
    assert source.client_data("client_1").x.shape == (40, 1, 8, 8)
    flat = synthetic(seed=0, num_clients=3, num_features=64)
    assert torch.equal(flat.client_data("client_1").x,
                       source.client_data("client_1").x.reshape(40, 64))


def test_synthetic_client_data_depends_only_on_seed_and_client() -> None:
    forward = synthetic(seed=3, num_clients=1000, cache_clients=0)
    wanted = forward.client_data("client_500")
    other = synthetic(seed=3, num_clients=1000, cache_clients=2)
    for i in (499, 1, 999, 2, 501):  # other clients first, in another order, through a cache
        other.client_data(f"client_{i}")
    again = other.client_data("client_500")
    assert torch.equal(wanted.x, again.x) and torch.equal(wanted.y, again.y)
    # The federation's size does not matter either, only (seed, client index).
    small = synthetic(seed=3, num_clients=501)
    assert torch.equal(small.client_data("client_500").x, wanted.x)
    assert not torch.equal(synthetic(seed=4, num_clients=1000).client_data("client_500").x,
                           wanted.x)
    assert not torch.equal(forward.client_data("client_501").x, wanted.x)


def test_synthetic_inputs_have_the_leaf_covariance_and_beta_moves_client_means() -> None:
    # x ~ N(v_k, diag(j^-1.2)): each feature's variance within one client.
    source = synthetic(seed=1, num_clients=2, samples_per_client=20000, num_features=8)
    x, _ = source.generate(0)
    expected = np.arange(1, 9) ** -1.2
    assert np.allclose(x.var(axis=0), expected, rtol=0.05)

    # v_k ~ N(B_k, 1), B_k ~ N(0, beta): a client's mean feature value spreads with beta.
    def spread(beta: float) -> float:
        fed = synthetic(seed=2, num_clients=400, samples_per_client=20, num_features=60,
                        beta=beta)
        return float(np.std([fed.generate(k)[0].mean() for k in range(400)]))

    # std of mean_j(v_kj) is sqrt(beta^2 + 1/60), plus sampling noise of the x draws.
    assert spread(0.0) == pytest.approx((1 / 60) ** 0.5, rel=0.2)
    assert spread(2.0) == pytest.approx((4 + 1 / 60) ** 0.5, rel=0.15)


def test_synthetic_labels_are_a_linear_function_of_the_inputs_per_client() -> None:
    from sklearn.linear_model import LogisticRegression

    source = synthetic(seed=5, num_clients=3, samples_per_client=300, num_features=10,
                       num_classes=3, beta=0.0)
    for k in range(3):
        x, y = source.generate(k)
        if len(set(y.tolist())) < 2:
            continue
        fit = LogisticRegression(C=1e6, max_iter=5000).fit(x, y)
        assert fit.score(x, y) >= 0.99  # argmax(W_k x + b_k): linearly separable


def test_synthetic_alpha_shifts_every_logit_alike() -> None:
    # u_k ~ N(0, alpha) enters W_k and b_k for every class alike: same draws, same labels.
    calm = synthetic(seed=7, num_clients=30, alpha=0.0)
    wild = synthetic(seed=7, num_clients=30, alpha=3.0)
    same = total = 0
    for k in range(30):
        (xa, ya), (xb, yb) = calm.generate(k), wild.generate(k)
        assert np.array_equal(xa, xb)
        same += int((ya == yb).sum())
        total += len(ya)
    assert same / total > 0.99  # float32 rounding may flip a near tie


def test_synthetic_clients_are_label_skewed() -> None:
    source = synthetic(seed=0, num_clients=200, samples_per_client=100)
    overall = np.zeros(10)
    mixes = []
    for k in range(200):
        counts = np.bincount(source.generate(k)[1], minlength=10)
        overall += counts
        mixes.append(counts / counts.sum())
    overall /= overall.sum()
    distance = np.mean([0.5 * np.abs(mix - overall).sum() for mix in mixes])
    assert distance > 0.5, distance  # most of a client's labels are one or two classes


def test_synthetic_lognormal_sizes_are_bounded_and_deterministic() -> None:
    args = {"samples_per_client": 10, "size_lognormal": [3.0, 1.5], "max_samples_per_client": 400}
    source = synthetic(seed=0, num_clients=300, **args)
    sizes = [len(source.generate(k)[1]) for k in range(300)]
    assert min(sizes) >= 10 and max(sizes) == 400 and len(set(sizes)) > 50
    again = synthetic(seed=0, num_clients=300, **args)
    assert [len(again.generate(k)[1]) for k in range(300)] == sizes
    assert len(source.client_data("client_7")) == sizes[7] - round(0.2 * sizes[7])


def test_synthetic_keeps_a_bounded_cache() -> None:
    source = synthetic(seed=0, num_clients=1000, test_clients=4, cache_clients=3)
    assert source.generated == 4 and source.num_cached() == 0  # the test set's clients
    first = source.client_data("client_10")
    assert source.client_data("client_10") is first and source.generated == 5
    for i in range(20, 30):
        source.client_data(f"client_{i}")
    assert source.num_cached() == 3 and source.generated == 15
    assert source.client_data("client_10") is not first  # evicted, generated again
    assert torch.equal(source.client_data("client_10").x, first.x)
    uncached = synthetic(seed=0, num_clients=10, cache_clients=0)
    uncached.client_data("client_1")
    assert uncached.num_cached() == 0


def test_synthetic_test_set_is_the_held_out_data_of_spread_clients() -> None:
    source = synthetic(seed=0, num_clients=100_000, test_clients=5, samples_per_client=50)
    assert source.test_indices.tolist() == [0, 25000, 50000, 74999, 99999]
    assert len(source.test) == 5 * 10
    for slot, k in enumerate(source.test_indices.tolist()):
        x, y = source.generate(k)
        assert torch.equal(source.test.x[slot * 10:(slot + 1) * 10], torch.from_numpy(x[40:]))
        assert torch.equal(source.test.y[slot * 10:(slot + 1) * 10], torch.from_numpy(y[40:]))
        train = source.client_data(f"client_{k}")
        assert torch.equal(train.x, torch.from_numpy(x[:40]))  # train and test are disjoint


def test_synthetic_report_is_bounded_and_generates_no_client() -> None:
    source = synthetic(seed=0, num_clients=100_000, test_clients=8)
    before = source.generated
    report = source.report()
    assert source.generated == before
    assert report["num_clients"] == 100_000 and report["on_demand"] is True
    assert report["client_sizes"] == {"samples_per_client": 50, "train": 40, "held_out": 10}
    assert report["test_samples"] == 80 and sum(report["test_label_counts"]) == 80
    assert len(report["clients"]) == 8
    for cid, entry in report["clients"].items():
        assert entry["label_counts"] == source.client_data(cid).label_counts()
    json.dumps(report)  # partition.json


def test_synthetic_unknown_client_ids_are_key_errors() -> None:
    source = synthetic(seed=0, num_clients=10)
    for bad in ("client_10", "client_-1", "client_01", "client_", "worker_1", "client_1 "):
        with pytest.raises(KeyError):
            source.client_data(bad)
    assert source.index_of("client_9") == 9


@pytest.mark.parametrize("args", [
    {"num_clients": 0},
    {"samples_per_client": 0},
    {"num_features": 0},
    {"num_classes": 1},
    {"alpha": -0.1},
    {"beta": -1.0},
    {"test_fraction": 1.0},
    {"test_clients": 0},
    {"cache_clients": -1},
    {"size_lognormal": [4.0]},
    {"size_lognormal": [4.0, -1.0]},
    {"samples_per_client": 50, "max_samples_per_client": 49},
    {"num_features": 60, "shape": [1, 8, 8]},
    {"num_features": 0, "shape": [0]},
])
def test_synthetic_bad_arguments_are_config_errors(args: dict) -> None:
    with pytest.raises(ConfigError):
        synthetic(seed=0, **args)


def test_datasets_are_registered_and_seed_is_injected() -> None:
    assert {"dataset.digits", "dataset.synthetic", "dataset.mnist"} <= set(registry.names("dataset"))
    built = registry.build("dataset", {"type": "synthetic", "args": {"samples_per_client": 20}},
                           "data", seed=9, num_clients=5, test_fraction=0.5)
    assert built.num_clients == 5
    assert torch.equal(built.client_data("client_2").x,
                       synthetic(seed=9, num_clients=5, samples_per_client=20,
                                 test_fraction=0.5).client_data("client_2").x)
    assert len(built.client_data("client_2")) == 10
    for injected in ("seed", "num_clients", "test_fraction"):
        with pytest.raises(ConfigError, match=rf"data\.args\.{injected}: .*set by oiafed"):
            registry.build("dataset", {"type": "synthetic", "args": {injected: 1}}, "data",
                           seed=9, num_clients=5, test_fraction=0.5)


# -- ClientIds ----------------------------------------------------------------------------------


def test_client_ids_behave_like_the_list_of_ids() -> None:
    ids = ClientIds(12)
    listed = [f"client_{i}" for i in range(12)]
    assert len(ids) == 12 and list(ids) == listed and ids == listed and ids == ClientIds(12)
    assert ids != ClientIds(11) and ids != listed[:-1]
    assert ids[0] == "client_0" and ids[-1] == "client_11" and ids[3:6] == listed[3:6]
    assert ids[::5] == listed[::5]
    with pytest.raises(IndexError):
        ids[12]
    with pytest.raises(IndexError):
        ids[-13]
    assert "client_11" in ids and "client_12" not in ids and 3 not in ids
    assert "client_011" not in ids and "client_+1" not in ids and "client_١" not in ids
    assert ids.index("client_7") == 7 and listed.index("client_7") == 7
    with pytest.raises(ValueError):
        ids.index("client_12")
    with pytest.raises(ValueError):
        ids.index("client_3", 4)


# -- MNIST: the real files ----------------------------------------------------------------------


needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
                                 reason=f"no MNIST copy at {MNIST_DIR}")


@needs_mnist
def test_mnist_train_split_matches_the_published_counts() -> None:
    data = mnist(seed=0, root=str(MNIST_DIR), split="train")
    assert data.x.shape == (60000, 1, 28, 28)
    assert data.x.dtype == torch.float32
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0
    assert data.num_classes == 10
    assert data.label_counts() == MNIST_TRAIN_COUNTS


@needs_mnist
def test_mnist_test_split_has_10000_images() -> None:
    data = mnist(seed=0, root=str(MNIST_DIR), split="test")
    assert data.x.shape == (10000, 1, 28, 28)
    assert sum(data.label_counts()) == 10000
    assert min(data.label_counts()) > 800  # every digit is there


# -- MNIST: small hand-made IDX files -----------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, images: dict[str, bytes], labels: dict[str, bytes],
                compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        for kind, content in (("images-idx3", images[prefix]), ("labels-idx1", labels[prefix])):
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(content))
            else:
                (folder / name).write_bytes(content)


@pytest.fixture
def tiny_mnist() -> tuple[dict[str, bytes], dict[str, bytes], dict[str, np.ndarray]]:
    gen = np.random.default_rng(0)
    raw = {
        "train_x": gen.integers(0, 256, size=(6, 28, 28)), "train_y": np.array([0, 1, 2, 3, 4, 9]),
        "test_x": gen.integers(0, 256, size=(3, 28, 28)), "test_y": np.array([5, 5, 7]),
    }
    raw["train_x"][0, 0, 0], raw["train_x"][0, 0, 1] = 0, 255
    images = {"train": idx_bytes(raw["train_x"]), "t10k": idx_bytes(raw["test_x"])}
    labels = {"train": idx_bytes(raw["train_y"]), "t10k": idx_bytes(raw["test_y"])}
    return images, labels, raw


@pytest.mark.parametrize(("layout", "compress"), [(".", True), (".", False), ("MNIST/raw", True),
                                                  ("raw", False)])
def test_mnist_reads_idx_files_in_each_layout(tmp_path: Path, tiny_mnist, layout: str,
                                              compress: bool) -> None:
    images, labels, raw = tiny_mnist
    write_mnist(tmp_path / layout, images, labels, compress)
    train = mnist(seed=0, root=str(tmp_path), split="train")
    assert train.x.shape == (6, 1, 28, 28)
    assert torch.allclose(train.x[:, 0], torch.as_tensor(raw["train_x"] / 255.0, dtype=torch.float32))
    assert train.y.tolist() == [0, 1, 2, 3, 4, 9]
    both = mnist(seed=0, root=str(tmp_path), split="all")
    assert both.y.tolist() == [0, 1, 2, 3, 4, 9, 5, 5, 7]
    assert both.num_classes == 10
    assert mnist(seed=0, root=str(tmp_path), split="test").y.tolist() == [5, 5, 7]


def test_mnist_missing_folder_or_file_is_a_config_error(tmp_path: Path, tiny_mnist) -> None:
    with pytest.raises(ConfigError, match="no train-images-idx3-ubyte"):
        mnist(seed=0, root=str(tmp_path / "nowhere"))
    images, labels, _ = tiny_mnist
    write_mnist(tmp_path, images, labels)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(mnist(seed=0, root=str(tmp_path), split="train")) == 6
    with pytest.raises(ConfigError, match="no t10k-labels-idx1-ubyte"):
        mnist(seed=0, root=str(tmp_path), split="test")


def test_mnist_bad_split_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split must be"):
        mnist(seed=0, root=str(tmp_path), split="validation")


def corruptions(good: bytes) -> dict[str, tuple[bytes, bool]]:
    """Broken versions of an IDX file: name -> (bytes, whether to gzip them)."""
    packed = gzip.compress(good)
    return {
        "truncated body": (good[:-5], True),
        "truncated body, uncompressed": (good[:-5], False),
        "truncated header": (good[:6], False),
        "empty": (b"", False),
        "float magic": (good[:2] + b"\x0d" + good[3:], True),
        "truncated gzip stream": (packed[: len(packed) // 2], None),
        "not gzip at all": (b"this is not a gzip file", None),
    }


@pytest.mark.parametrize("case", list(corruptions(b"\0" * 8)))
@pytest.mark.parametrize("which", ["images", "labels"])
def test_mnist_corrupt_idx_file_is_a_config_error(tmp_path: Path, tiny_mnist, case: str,
                                                  which: str) -> None:
    images, labels, _ = tiny_mnist
    write_mnist(tmp_path, images, labels)
    stem = f"train-{which}-idx{3 if which == 'images' else 1}-ubyte"
    good = (images if which == "images" else labels)["train"]
    content, compress = corruptions(good)[case]
    (tmp_path / (stem + ".gz")).unlink()
    if compress is None:  # bytes are already what goes into the .gz file
        (tmp_path / (stem + ".gz")).write_bytes(content)
    elif compress:
        (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(content))
    else:
        (tmp_path / stem).write_bytes(content)
    with pytest.raises(ConfigError, match=stem):
        mnist(seed=0, root=str(tmp_path), split="train")
    # Through the config path it stays a ConfigError (the CLI's exit code 2).
    with pytest.raises(ConfigError):
        registry.build("dataset", {"type": "mnist", "args": {"root": str(tmp_path)}}, "data", seed=0)


def test_mnist_images_and_labels_of_different_lengths_are_a_config_error(tmp_path: Path,
                                                                         tiny_mnist) -> None:
    # 6 + 3 images against 7 + 2 labels: the totals agree, the files do not.
    images, labels, _ = tiny_mnist
    labels = {"train": idx_bytes(np.arange(7)), "t10k": idx_bytes(np.array([1, 2]))}
    write_mnist(tmp_path, images, labels)
    with pytest.raises(ConfigError, match="train has 6 images but 7 labels"):
        registry.build("dataset", {"type": "mnist", "args": {"root": str(tmp_path)}}, "data", seed=0)
