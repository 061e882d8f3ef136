"""The serial runtime: every sampled client trains in turn, in this process."""

from __future__ import annotations

from typing import Any

from oiafed.core.types import ClientUpdate, Weights
from oiafed.runtime.worker import ClientWorker


class SerialRuntime:
    """Trains the sampled clients one after another with one in-process ``ClientWorker``.

    Learner hooks run on the same callback instances as the trainer's.
    """

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker

    async def start(self, trainer: Any) -> None:
        """Nothing to start."""

    async def train(
        self, round_num: int, client_ids: list[str], weights: Weights, config: dict[str, Any]
    ) -> list[ClientUpdate]:
        return [await self.worker.train(cid, weights, round_num, config) for cid in client_ids]

    async def close(self) -> None:
        """Nothing to stop."""
