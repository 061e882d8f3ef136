"""In-memory labelled data: features and integer labels as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ArrayDataset:
    """Features ``x`` (float32, ``N x input_shape``) and labels ``y`` (int64, ``N``)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} samples but {len(self.y)} labels")

    @classmethod
    def from_numpy(cls, x: np.ndarray, y: np.ndarray, num_classes: int | None = None) -> ArrayDataset:
        labels = np.asarray(y, dtype=np.int64)
        classes = int(labels.max()) + 1 if num_classes is None else num_classes
        return cls(torch.as_tensor(np.asarray(x, dtype=np.float32)), torch.as_tensor(labels), classes)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(self.x[index], self.y[index], self.num_classes)

    def label_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()


@dataclass(frozen=True)
class TrainTest:
    """A dataset that comes with an official test set: its training pool (partitioned among
    the clients) and its test set (the global test set), kept apart unless
    ``data.test_set: split`` pools them."""

    train: ArrayDataset
    test: ArrayDataset

    def pooled(self) -> ArrayDataset:
        """Training and test sets in one pool (training samples first)."""
        return ArrayDataset(torch.cat([self.train.x, self.test.x]),
                            torch.cat([self.train.y, self.test.y]), self.train.num_classes)
