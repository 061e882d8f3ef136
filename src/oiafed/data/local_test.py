"""Each client's local test set: a share of its own data held out (``data.local_test_fraction``),
on which its personal model is evaluated."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from oiafed.exceptions import ConfigError
from oiafed.seeding import LOCAL_TEST, rng

if TYPE_CHECKING:
    from oiafed.data.arrays import ArrayDataset

KEY = "data.local_test_fraction"


def split_local_tests(parts: list[np.ndarray], labels: np.ndarray, fraction: float,
                      gen: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's part split into (training, local test) index arrays, both sorted.

    Stratified where the client has enough samples of a class: of a class with ``n_c``
    samples, ``round(fraction * n_c)`` go to the test set when that leaves at least one for
    training and takes at least one; the samples of the classes too rare for that are pooled
    and split by ``fraction`` as a whole. Which samples go is drawn from ``gen``.

    Raises:
        ConfigError: naming ``data.local_test_fraction`` when a client would be left without
            training data.
    """
    train_parts, test_parts = [], []
    for index, part in enumerate(parts):
        shuffled = gen.permutation(part)
        test, rare = [], []
        for label in np.unique(labels[shuffled]):
            members = shuffled[labels[shuffled] == label]
            take = round(fraction * len(members))
            if 1 <= take < len(members):
                test.append(members[:take])
            else:
                rare.append(members)
        if rare:
            pooled = gen.permutation(np.concatenate(rare))
            test.append(pooled[:round(fraction * len(pooled))])
        chosen = np.concatenate(test) if test else np.empty(0, dtype=part.dtype)
        train = np.setdiff1d(part, chosen)
        if len(train) == 0:
            raise ConfigError(
                f"client_{index} has {len(part)} sample(s): a local test share of {fraction} "
                "leaves it no training data; lower it or give clients more data", KEY)
        train_parts.append(train)
        test_parts.append(np.sort(chosen))
    return train_parts, test_parts


def split_own_data(data: ArrayDataset, fraction: float,
                   seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A client's own dataset (a gRPC client's ``--local-data``) as (training data, local test
    set): held out as ``split_local_tests`` holds out a share of each part of a partition,
    drawn from ``seed``.

    Raises:
        ConfigError: naming ``data.local_test_fraction`` when no training data would be left.
    """
    try:
        (train,), (test,) = split_local_tests([np.arange(len(data))], data.y.numpy(), fraction,
                                              rng(seed, LOCAL_TEST))
    except ConfigError:
        raise ConfigError(f"this client's local dataset has {len(data)} sample(s): a local test "
                          f"share of {fraction} leaves it no training data", KEY) from None
    return data.subset(train), data.subset(test)
