"""LEAF's Synthetic(alpha, beta) federation, each client's data generated on demand.

The generator of Li et al. (FedProx, MLSys 2020) as packaged by LEAF (Caldas et al., 2018).
For client ``k`` (index ``k``), from its own random stream (a torch generator seeded with
``derive_seed(seed, DATA, k)``):

* model: ``u_k ~ N(0, alpha)``; ``W_k ~ N(u_k, 1)`` (``num_classes x num_features``),
  ``b_k ~ N(u_k, 1)`` (``num_classes``);
* inputs: ``B_k ~ N(0, beta)``; ``v_k ~ N(B_k, 1)`` per feature; ``x ~ N(v_k, Sigma)`` with
  ``Sigma`` diagonal, ``Sigma_jj = j^-1.2`` (``j = 1..num_features``);
* labels: ``y = argmax(softmax(W_k x + b_k))``.

As in the reference code, ``alpha`` and ``beta`` are standard deviations. Note that ``u_k`` adds
the same amount, ``u_k (sum(x) + 1)``, to every class's logit, so ``alpha`` changes the draws but
not how labels are distributed; clients differ through ``W_k``, ``b_k`` and ``v_k`` (``beta``).

Client ``k``'s data depends on ``(seed, k)`` and the generator's arguments only, so any process
gets the same data for a client without generating any other client.

Each client's generated samples are split: the last ``round(test_fraction * n_k)`` (at most
``n_k - 1``) are held out, the rest is its training data. The global test set is the held-out
data of ``test_clients`` clients spread evenly over the federation (indices
``linspace(0, num_clients - 1, test_clients)``), so it is bounded whatever the federation's size.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oiafed.data.arrays import ArrayDataset
from oiafed.data.federated import ClientIds, FederatedSource
from oiafed.exceptions import ConfigError
from oiafed.seeding import DATA, derive_seed


class LeafSynthetic(FederatedSource):
    """LEAF Synthetic(alpha, beta) with ``num_clients`` clients; data generated per client.

    Holds nothing per client: at most ``cache_clients`` clients' training data (least recently
    used evicted) plus the bounded global test set.

    Args:
        seed: the experiment seed.
        num_clients: clients in the federation.
        test_fraction: the share of each client's samples held out.
        samples_per_client: samples generated per client; with ``size_lognormal``, the minimum.
        num_features, num_classes: the task's dimensions (LEAF: 60 and 10).
        alpha: spread of the clients' models (0: the same prior mean for all).
        beta: spread of the clients' input distributions.
        size_lognormal: ``[mu, sigma]``: client ``k`` gets ``samples_per_client +
            floor(LogNormal(mu, sigma))`` samples (LEAF: ``[4, 2]`` with 50); None: fixed size.
        max_samples_per_client: cap on a client's sample count (for ``size_lognormal``).
        shape: each sample's shape (default ``[num_features]``), e.g. ``[1, 8, 8]`` with 64
            features for image models.
        test_clients: how many clients' held-out data form the global test set.
        cache_clients: how many clients' training data are kept after generation.

    Raises:
        ConfigError: on a value out of range (the message names it).
    """

    def __init__(
        self,
        seed: int,
        num_clients: int,
        *,
        test_fraction: float = 0.2,
        samples_per_client: int = 50,
        num_features: int = 60,
        num_classes: int = 10,
        alpha: float = 0.5,
        beta: float = 0.5,
        size_lognormal: Sequence[float] | None = None,
        max_samples_per_client: int | None = None,
        shape: Sequence[int] | None = None,
        test_clients: int = 100,
        cache_clients: int = 256,
    ) -> None:
        _check(num_clients >= 1, f"num_clients must be >= 1, got {num_clients}")
        _check(0 < test_fraction < 1, f"test_fraction must be in (0, 1), got {test_fraction}")
        _check(samples_per_client >= 1, f"samples_per_client must be >= 1, got {samples_per_client}")
        _check(num_features >= 1, f"num_features must be >= 1, got {num_features}")
        _check(num_classes >= 2, f"num_classes must be >= 2, got {num_classes}")
        _check(alpha >= 0 and beta >= 0, f"alpha and beta must be >= 0, got {alpha}, {beta}")
        _check(test_clients >= 1, f"test_clients must be >= 1, got {test_clients}")
        _check(cache_clients >= 0, f"cache_clients must be >= 0, got {cache_clients}")
        if size_lognormal is not None:
            size_lognormal = tuple(float(v) for v in size_lognormal)
            _check(len(size_lognormal) == 2 and size_lognormal[1] >= 0,
                   f"size_lognormal must be [mu, sigma] with sigma >= 0, got {list(size_lognormal)}")
        if max_samples_per_client is not None:
            _check(max_samples_per_client >= samples_per_client,
                   f"max_samples_per_client ({max_samples_per_client}) must be >= "
                   f"samples_per_client ({samples_per_client})")
        shape = (num_features,) if shape is None else tuple(int(s) for s in shape)
        _check(all(s >= 1 for s in shape) and math.prod(shape) == num_features,
               f"shape {list(shape)} must hold num_features={num_features} values")
        self.seed = seed
        self.test_fraction = test_fraction
        self.samples_per_client = samples_per_client
        self.num_features = num_features
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.size_lognormal = size_lognormal
        self.max_samples_per_client = max_samples_per_client
        self.input_shape = shape
        self.cache_clients = cache_clients
        self.client_ids = ClientIds(num_clients)
        self._scale = torch.arange(1, num_features + 1, dtype=torch.float64).pow(-0.6).float()
        # the standard deviations sqrt(j^-1.2) of x's diagonal covariance
        self._cache: OrderedDict[int, ArrayDataset] = OrderedDict()
        self._lock = threading.Lock()
        self.generated = 0
        """How many times a client's data was generated (test set and cache misses)."""
        self.test_indices = np.unique(
            np.linspace(0, num_clients - 1, min(test_clients, num_clients)).round().astype(np.int64))
        self.test, self._sample = self._build_test()

    # -- generation ----------------------------------------------------------------------------

    def _num_samples(self, gen: torch.Generator) -> int:
        if self.size_lognormal is None:
            return self.samples_per_client
        mu, sigma = self.size_lognormal
        draw = torch.empty((), dtype=torch.float64).log_normal_(mu, sigma, generator=gen)
        n = self.samples_per_client + int(min(draw.item(), 2**40))
        return n if self.max_samples_per_client is None else min(n, self.max_samples_per_client)

    def num_held_out(self, n: int) -> int:
        """How many of a client's ``n`` generated samples are held out (never all of them)."""
        return min(n - 1, math.floor(self.test_fraction * n + 0.5))

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """All samples of client ``index`` (training then held-out): ``x`` (float32, ``n x
        num_features``) and ``y`` (int64), a pure function of ``(seed, index)`` and the args."""
        x, y = self._make(index)
        return x.numpy(), y.numpy()

    def _make(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``generate`` as tensors. One draw of standard normals holds every random number
        (few calls, in torch: a client's data is made in each round it is sampled in)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, DATA, index))
        self.generated += 1
        n = self._num_samples(gen)
        c, d = self.num_classes, self.num_features
        z = torch.randn(2 + c * (d + 1) + d + n * d, generator=gen)
        u, b_k = self.alpha * z[0], self.beta * z[1]
        model = z[2:2 + c * (d + 1)].view(c, d + 1) + u  # [W_k | b_k]
        centre = z[2 + c * (d + 1):2 + c * (d + 1) + d] + b_k  # v_k
        x = z[-n * d:].view(n, d).mul_(self._scale).add_(centre)
        y = torch.argmax(x @ model[:, :d].T + model[:, d], dim=1)  # softmax keeps the argmax
        return x, y

    def _split(self, index: int, held_out: bool = True) -> tuple[ArrayDataset, ArrayDataset | None]:
        """Client ``index``'s training data and (with ``held_out``) its held-out data."""
        x, y = self._make(index)
        cut = len(y) - self.num_held_out(len(y))
        x = x.view(len(y), *self.input_shape)
        train = ArrayDataset(x[:cut], y[:cut], self.num_classes)
        return train, ArrayDataset(x[cut:], y[cut:], self.num_classes) if held_out else None

    def _build_test(self) -> tuple[ArrayDataset, dict[str, Any]]:
        xs, ys, sample = [], [], {}
        for index in self.test_indices.tolist():
            train, held_out = self._split(index)
            assert held_out is not None  # _split gives it with held_out=True (the default)
            xs.append(held_out.x)
            ys.append(held_out.y)
            sample[self.client_ids[index]] = {"num_samples": len(train),
                                              "label_counts": train.label_counts()}
        test = ArrayDataset(torch.cat(xs), torch.cat(ys), self.num_classes)
        return test, sample

    # -- the FederatedSource surface -----------------------------------------------------------

    def index_of(self, cid: str) -> int:
        try:
            return self.client_ids.index(cid)
        except ValueError:
            raise KeyError(f"unknown client id {cid!r}") from None

    def client_size(self, cid: str) -> int:
        """Client ``cid``'s training samples, from the first draw of its stream (its data is
        not generated)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, DATA, self.index_of(cid)))
        n = self._num_samples(gen)
        return n - self.num_held_out(n)

    def client_data(self, cid: str) -> ArrayDataset:
        """Client ``cid``'s training data: from the cache, or generated (and cached)."""
        index = self.index_of(cid)
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
        data, _ = self._split(index, held_out=False)
        with self._lock:
            if self.cache_clients:
                self._cache[index] = data
                while len(self._cache) > self.cache_clients:
                    self._cache.popitem(last=False)
        return data

    def num_cached(self) -> int:
        """How many clients' data the cache holds now (at most ``cache_clients``)."""
        return len(self._cache)

    def size_rule(self) -> dict[str, Any]:
        """How many samples a client has, without generating any."""
        if self.size_lognormal is None:
            n = self.samples_per_client
            return {"samples_per_client": n, "train": n - self.num_held_out(n),
                    "held_out": self.num_held_out(n)}
        mu, sigma = self.size_lognormal
        return {"samples_per_client": f"{self.samples_per_client} + floor(LogNormal({mu}, {sigma}))",
                "max_samples_per_client": self.max_samples_per_client,
                "held_out": f"round({self.test_fraction} x samples), at most samples - 1"}

    def report(self) -> dict[str, Any]:
        """Sizes by rule, the test set's histogram, and histograms of a bounded sample of clients
        (those whose held-out data form the test set); no other client is generated."""
        return {
            "num_clients": self.num_clients,
            "num_classes": self.num_classes,
            "on_demand": True,
            "generator": {"name": "leaf_synthetic", "alpha": self.alpha, "beta": self.beta,
                          "num_features": self.num_features, "shape": list(self.input_shape)},
            "client_sizes": self.size_rule(),
            "test_samples": len(self.test),
            "test_label_counts": self.test.label_counts(),
            "test_clients": len(self.test_indices),
            "clients_note": "a sample: the clients whose held-out data form the test set",
            "clients": self._sample,
        }


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
