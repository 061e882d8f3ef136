"""Partitioners: split the training pool's indices among clients.

Every partitioner is called as ``partitioner(labels, num_clients, rng)`` and returns one
sorted index array per client; together they are disjoint and cover every sample.
"""

from __future__ import annotations

import numpy as np

from oiafed.exceptions import ConfigError
from oiafed.registry import register

MAX_ATTEMPTS = 1000


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check_min_size(min_size: int, num_samples: int, num_clients: int) -> None:
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_clients > num_samples:
        raise ConfigError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
            f"samples; the training pool has {num_samples}"
        )


@register("partitioner.iid")
class IID:
    """Shuffle and deal out samples evenly (sizes differ by at most one).

    YAML:
        partition: {type: iid}
    """

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
        return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


@register("partitioner.dirichlet")
class Dirichlet:
    """Label skew: each class is split among clients with Dirichlet(alpha) proportions.

    Args:
        alpha: concentration; small values (0.1) give very skewed clients, large ones near-IID.
        min_size: every client gets at least this many samples (proportions are redrawn).

    Raises:
        ConfigError: when ``alpha <= 0`` or ``min_size`` cannot be met.

    YAML:
        partition: {type: dirichlet, args: {alpha: 0.5, min_size: 10}}
    """

    def __init__(self, alpha: float = 0.5, min_size: int = 10) -> None:
        if alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.min_size = min_size

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
        _check_min_size(self.min_size, len(labels), num_clients)
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
        for _ in range(MAX_ATTEMPTS):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for members in by_class:
                shares = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for client, chunk in enumerate(np.split(members, cuts)):
                    parts[client].append(chunk)
            merged = [np.concatenate(p) for p in parts]
            if min(len(m) for m in merged) >= self.min_size:
                return _finish(merged)
        raise ConfigError(
            f"no Dirichlet(alpha={self.alpha}) draw gave every client >= {self.min_size} samples "
            f"in {MAX_ATTEMPTS} tries; lower min_size or raise alpha"
        )


@register("partitioner.shards")
class Shards:
    """Pathological non-IID (McMahan et al.): sort by label, cut into shards, give each client
    ``labels_per_client`` shards, so most clients see that many labels.

    Args:
        labels_per_client: shards (hence labels, at most) per client.

    YAML:
        partition: {type: shards, args: {labels_per_client: 2}}
    """

    def __init__(self, labels_per_client: int = 2) -> None:
        if labels_per_client < 1:
            raise ConfigError(f"labels_per_client must be >= 1, got {labels_per_client}")
        self.labels_per_client = labels_per_client

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
        num_shards = num_clients * self.labels_per_client
        if num_shards > len(labels):
            raise ConfigError(
                f"{num_clients} clients x {self.labels_per_client} shards needs at least "
                f"{num_shards} samples; the training pool has {len(labels)}"
            )
        order = np.lexsort((rng.random(len(labels)), labels))
        shards = np.array_split(order, num_shards)
        owner = rng.permutation(num_shards)
        return _finish([
            np.concatenate([shards[s] for s in owner[c::num_clients]]) for c in range(num_clients)
        ])


@register("partitioner.quantity")
class Quantity:
    """Quantity skew: client sizes follow Dirichlet(alpha) shares; labels stay IID.

    Args:
        alpha: concentration of the size shares (small: very unequal sizes).
        min_size: every client gets at least this many samples.

    YAML:
        partition: {type: quantity, args: {alpha: 1.0, min_size: 5}}
    """

    def __init__(self, alpha: float = 1.0, min_size: int = 1) -> None:
        if alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.min_size = min_size

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator):
        n = len(labels)
        _check_min_size(self.min_size, n, num_clients)
        spare = n - self.min_size * num_clients
        shares = rng.dirichlet(np.full(num_clients, self.alpha))
        extra = np.floor(shares * spare).astype(int)
        extra[: spare - extra.sum()] += 1
        sizes = extra + self.min_size
        return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))
