"""The serial runtime: every sampled client trains in turn, in this process."""

from __future__ import annotations

from typing import Any

from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, Weights
from oiafed.data.federated import FederatedData
from oiafed.seeding import TRAIN, derive_seed


class SerialRuntime:
    """Trains the sampled clients one after another with one shared ``Learner``."""

    def __init__(self, learner: Learner, data: FederatedData, seed: int) -> None:
        self.learner = learner
        self.data = data
        self.seed = seed

    async def train(
        self, round_num: int, client_ids: list[str], weights: Weights, config: dict[str, Any]
    ) -> list[ClientUpdate]:
        updates = []
        for cid in client_ids:
            seed = derive_seed(self.seed, TRAIN, round_num, self.data.index_of(cid))
            updates.append(await self.learner.fit(
                cid, weights, self.data.client_data(cid),
                round_num=round_num, seed=seed, config=config,
            ))
        return updates
