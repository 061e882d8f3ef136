"""Built-in datasets. Each returns the whole labelled pool as an ``ArrayDataset``; oiafed
splits off the global test set and partitions the rest among clients."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import ConfigError
from oiafed.registry import register
from oiafed.seeding import DATA, rng


@register("dataset.digits")
def digits(seed: int, flatten: bool = False) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); works offline.

    Args:
        flatten: give 64 features instead of ``1 x 8 x 8`` images (models flatten anyway).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    x = x.reshape(len(x), -1) if flatten else x[:, None, :, :]
    return ArrayDataset.from_numpy(x, bunch.target, num_classes=10)


@register("dataset.synthetic")
def synthetic(
    seed: int,
    num_samples: int = 2000,
    num_features: int = 20,
    num_classes: int = 5,
    noise: float = 0.5,
) -> ArrayDataset:
    """Gaussian class clusters generated from the seed: a quick, dependency-free task.

    Args:
        num_samples: pool size (before the test split).
        num_features: feature dimension.
        num_classes: number of labels.
        noise: standard deviation around each class centre (larger is harder).
    """
    if num_samples < num_classes or num_features < 1 or num_classes < 2 or noise < 0:
        raise ConfigError(
            "need num_samples >= num_classes, num_features >= 1, num_classes >= 2, noise >= 0"
        )
    gen = rng(seed, DATA)
    centres = gen.normal(0.0, 1.0, size=(num_classes, num_features))
    labels = gen.integers(0, num_classes, size=num_samples)
    features = centres[labels] + gen.normal(0.0, noise, size=(num_samples, num_features))
    return ArrayDataset.from_numpy(features, labels, num_classes=num_classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ConfigError(f"{path} is truncated: its header is cut short")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated or corrupt: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(f"no {stem}[.gz] under {root} (looked in ., MNIST/raw, raw)")


@register("dataset.mnist")
def mnist(seed: int, root: str, split: str = "all") -> ArrayDataset:
    """MNIST (or Fashion-MNIST) from the four IDX files in a local folder; never downloads.

    Args:
        root: folder holding ``train-images-idx3-ubyte[.gz]`` and the three other files.
        split: ``train``, ``test`` or ``all`` (both pooled; oiafed makes its own test split).
    """
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split must be 'train', 'test' or 'all', got {split!r}")
    folder = Path(root).expanduser()
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    images = [_read_idx(_find(folder, f"{p}-images-idx3-ubyte")) for p in prefixes]
    labels = [_read_idx(_find(folder, f"{p}-labels-idx1-ubyte")) for p in prefixes]
    for prefix, x_part, y_part in zip(prefixes, images, labels, strict=True):
        if len(x_part) != len(y_part):
            raise ConfigError(f"{folder}: {prefix} has {len(x_part)} images but {len(y_part)} labels")
    x = np.concatenate(images).astype(np.float32)[:, None, :, :] / 255.0
    return ArrayDataset.from_numpy(x, np.concatenate(labels), num_classes=10)
