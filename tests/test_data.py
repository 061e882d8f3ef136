"""Built-in datasets: digits, synthetic, and the MNIST IDX loader (real files and broken ones)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from oiafed import registry
from oiafed.data.arrays import ArrayDataset
from oiafed.data.datasets import digits, mnist, synthetic
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


# -- synthetic ----------------------------------------------------------------------------------


def test_synthetic_shape_and_classes() -> None:
    data = synthetic(seed=0, num_samples=300, num_features=7, num_classes=4)
    assert data.x.shape == (300, 7)
    assert data.x.dtype == torch.float32
    assert data.num_classes == 4
    assert set(data.y.tolist()) == {0, 1, 2, 3}


def test_synthetic_is_deterministic_per_seed() -> None:
    a, b = synthetic(seed=3, num_samples=200), synthetic(seed=3, num_samples=200)
    c = synthetic(seed=4, num_samples=200)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_synthetic_noise_controls_class_separation() -> None:
    def centre_spread(noise: float) -> float:
        data = synthetic(seed=1, num_samples=1000, num_features=5, num_classes=3, noise=noise)
        spread = [data.x[data.y == c].std(dim=0).mean() for c in range(3)]
        return float(np.mean(spread))

    assert centre_spread(0.1) == pytest.approx(0.1, rel=0.15)
    assert centre_spread(2.0) == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("args", [
    {"num_samples": 3, "num_classes": 5},
    {"num_features": 0},
    {"num_classes": 1},
    {"noise": -0.1},
])
def test_synthetic_bad_arguments_are_config_errors(args: dict) -> None:
    with pytest.raises(ConfigError):
        synthetic(seed=0, **args)


def test_datasets_are_registered_and_seed_is_injected() -> None:
    assert {"dataset.digits", "dataset.synthetic", "dataset.mnist"} <= set(registry.names("dataset"))
    built = registry.build("dataset", {"type": "synthetic", "args": {"num_samples": 50}}, "data",
                           seed=9)
    assert torch.equal(built.x, synthetic(seed=9, num_samples=50).x)
    with pytest.raises(ConfigError, match=r"data\.args\.seed"):
        registry.build("dataset", {"type": "synthetic", "args": {"seed": 1}}, "data", seed=9)


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
