"""The serial runtime: every sampled client trains in turn, in this process."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Sequence

from oiafed.core.types import ClientTask, Outcome, RoundTask
from oiafed.runtime.base import RoundLedger, RunSpec, Runtime
from oiafed.runtime.worker import ClientWorker


class SerialRuntime(Runtime):
    """Trains the sampled clients one after another with one in-process ``ClientWorker``.

    Learner hooks run on the same callback instances as the trainer's. Messages stay objects
    (nothing is encoded). A client cannot be stopped mid-training here: at the deadline, the
    client training then fails when it ends and the clients after it are not trained.
    """

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker
        self.spec = RunSpec(client_ids=(), num_sampled=0)

    async def start(self, spec: RunSpec) -> None:
        self.spec = spec

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        ledger = RoundLedger(task.round_num, [c.client_id for c in clients], deadline,
                             round_timeout=self.spec.round_timeout, strict=self.spec.strict)
        by_id = {c.client_id: c for c in clients}
        while not ledger.expired and (cid := ledger.take()) is not None:
            try:
                update = await self.worker.train(task, by_id[cid])
            except Exception:
                ledger.raised(cid, traceback.format_exc())
                continue
            finally:
                await asyncio.sleep(0)  # a Ctrl-C (task cancellation) lands between clients
            if ledger.expired:
                break
            ledger.answered(cid, update)
        if not ledger.done:
            ledger.expire()
        return ledger.results()
