"""Built-in datasets. ``digits`` returns the whole labelled pool as an ``ArrayDataset``
(oiafed splits off the global test set and partitions the rest among clients); ``mnist``
returns its official training and test sets as a ``TrainTest``; ``synthetic`` is a
``FederatedSource`` that generates each client's data on demand."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from oiafed.data.arrays import ArrayDataset, TrainTest
from oiafed.data.leaf import LeafSynthetic
from oiafed.exceptions import ConfigError
from oiafed.registry import register


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
    num_clients: int = 10,
    test_fraction: float = 0.2,
    samples_per_client: int = 50,
    num_features: int = 60,
    num_classes: int = 10,
    alpha: float = 0.5,
    beta: float = 0.5,
    size_lognormal: tuple[float, float] | None = None,
    max_samples_per_client: int | None = None,
    shape: list[int] | None = None,
    test_clients: int = 100,
    cache_clients: int = 256,
) -> LeafSynthetic:
    """LEAF's Synthetic(alpha, beta) (Li et al., FedProx): every client has its own logistic
    model and input distribution; its data is generated on demand from ``(seed, client)``, so a
    federation of any size needs no pooled array. Takes no ``data.partition``;
    ``data.num_clients`` and ``data.test_fraction`` are passed in. See ``oiafed.data.leaf``.

    Args:
        samples_per_client: samples generated per client (``test_fraction`` of them held out);
            with ``size_lognormal``, the minimum.
        num_features, num_classes: the task's dimensions (LEAF: 60 and 10).
        alpha: spread of the clients' models; beta: spread of their inputs (standard deviations).
        size_lognormal: ``[mu, sigma]``: LEAF's unequal sizes, ``samples_per_client +
            floor(LogNormal(mu, sigma))`` (LEAF: ``[4, 2]`` with 50); default: all equal.
        max_samples_per_client: cap on a client's size (with ``size_lognormal``).
        shape: each sample's shape, e.g. ``[1, 8, 8]`` with 64 features for a CNN.
        test_clients: the global test set is the held-out data of this many clients, spread
            evenly over the federation.
        cache_clients: clients' training data kept in memory after generation (LRU).

    YAML:
        data:
          type: synthetic
          num_clients: 100000
          args: {alpha: 1.0, beta: 1.0, samples_per_client: 50}
    """
    return LeafSynthetic(
        seed, num_clients, test_fraction=test_fraction, samples_per_client=samples_per_client,
        num_features=num_features, num_classes=num_classes, alpha=alpha, beta=beta,
        size_lognormal=size_lognormal, max_samples_per_client=max_samples_per_client,
        shape=shape, test_clients=test_clients, cache_clients=cache_clients,
    )


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
    raise ConfigError(f"no {stem}[.gz] under {root} (looked in ., MNIST/raw, raw)",
                      "data.args.root")


@register("dataset.mnist")
def mnist(seed: int, root: str, split: str = "official") -> ArrayDataset | TrainTest:
    """MNIST (or Fashion-MNIST) from the four IDX files in a local folder; never downloads.

    Args:
        root: folder holding ``train-images-idx3-ubyte[.gz]`` and the three other files.
        split: ``official`` (default): the training images (partitioned among the clients)
            and the test images (the global test set; ``data.test_set: split`` pools them);
            ``train``, ``test`` or ``all`` (both pooled): one pool that oiafed splits itself.

    YAML:
        data:
          type: mnist
          num_clients: 100
          args: {root: data/mnist}
    """
    splits = ("official", "train", "test", "all")
    if split not in splits:
        raise ConfigError(f"split must be one of {', '.join(splits)}; got {split!r}",
                          "data.args.split")
    folder = Path(root).expanduser()
    if split == "official":
        return TrainTest(_mnist_part(folder, "train"), _mnist_part(folder, "t10k"))
    parts = [_mnist_part(folder, p) for p in {"train": ["train"], "test": ["t10k"],
                                               "all": ["train", "t10k"]}[split]]
    return ArrayDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), 10)


def _mnist_part(folder: Path, prefix: str) -> ArrayDataset:
    """The images and labels of one of MNIST's parts (``train`` or ``t10k``), scaled to [0, 1]."""
    images = _read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ConfigError(f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels")
    x = images.astype(np.float32)[:, None, :, :] / 255.0
    return ArrayDataset.from_numpy(x, labels, num_classes=10)
