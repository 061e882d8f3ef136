"""The runtime contract, and the round bookkeeping and failure policy every runtime shares.

A runtime decides only *where* learners train. The trainer starts it with a ``RunSpec`` (a
small frozen description of the run: it never sees the ``Trainer``), asks it to ``train`` a
list of clients for a round before a deadline, and closes it with a ``RunEnd``. Joins of
remote clients are reported through ``take_joins``; the trainer fires the hooks.

Every runtime keeps a round's books in a ``RoundLedger``, so they all answer the same way:

* a client whose training raises is a ``ClientFailure`` carrying its traceback text; with
  ``strict: true`` the run fails instead (``ClientTrainingError``, with that traceback);
* a client whose worker process (or actor) dies is retried once on a fresh one
  (``ATTEMPTS``), then fails;
* at the deadline (``trainer.round_timeout``), clients still training or not yet started fail;
* an answer for a client that is not awaited (a duplicate, a stray, a revoked copy) is ignored,
  and one that names another client fails the client it was asked of;
* outcomes come back in the order of the round's clients.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oiafed.core.types import ClientFailure, ClientTask, ClientUpdate, Outcome, RoundTask
from oiafed.exceptions import ClientTrainingError
from oiafed.runtime.envelope import decode_update

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig

logger = logging.getLogger(__name__)

ATTEMPTS = 2
"""Tries a client gets when the process training it dies (the first and one retry)."""


@dataclass(frozen=True)
class RunSpec:
    """What a runtime knows of the run it serves.

    Attributes:
        client_ids: every client of the federation, in index order.
        num_sampled: how many clients a round samples.
        min_clients: the quorum of usable updates a round needs.
        round_timeout: seconds a round may take (None: no limit), for messages.
        run_dir: the run folder (None outside ``oiafed.run``).
        config: the experiment's config (workers elsewhere rebuild everything from it).
        strict: a client whose training raises fails the run.
    """

    client_ids: Sequence[str]
    num_sampled: int
    min_clients: int = 1
    round_timeout: float | None = None
    run_dir: Path | None = None
    config: ExperimentConfig | None = None
    strict: bool = False


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, for ``Runtime.close``: ``ok`` and a reason in words."""

    ok: bool
    reason: str


class Runtime(ABC):
    """Where learners train; the only thing that differs between runtimes."""

    async def start(self, spec: RunSpec) -> None:
        """Get ready to train clients of the run ``spec`` describes (start workers, listen)."""

    @abstractmethod
    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        """Train ``clients`` from ``task``; one outcome per client, in order.

        ``deadline`` is a ``time.monotonic()`` instant (None: no limit).
        """

    async def close(self, end: RunEnd) -> None:
        """Stop what ``start`` started; ``end`` says whether the run ended well, and why."""

    def take_joins(self) -> list[str]:
        """The clients that joined (or rejoined) since the last call (remote runtimes)."""
        return []


class RoundLedger:
    """One round's books: who is pending, running, answered; retries; the deadline.

    Args:
        round_num: the round.
        client_ids: the round's clients, in order.
        deadline: ``time.monotonic()`` instant the round ends at (None: no limit).
        round_timeout: the setting behind ``deadline``, for messages.
        strict: a client whose training raises fails the run.
    """

    def __init__(self, round_num: int, client_ids: Sequence[str], deadline: float | None = None,
                 *, round_timeout: float | None = None, strict: bool = False) -> None:
        self.round_num = round_num
        self.client_ids = list(client_ids)
        self.deadline = deadline
        self.round_timeout = round_timeout
        self.strict = strict
        self.pending: deque[str] = deque(dict.fromkeys(self.client_ids))
        self.running: set[str] = set()
        self.outcomes: dict[str, Outcome] = {}
        self.deaths: dict[str, int] = {}
        self._wanted = len(self.pending)

    # -- handing out -----------------------------------------------------------------------

    def take(self) -> str | None:
        """The next client to train (now running), or None when none is pending."""
        if not self.pending:
            return None
        cid = self.pending.popleft()
        self.running.add(cid)
        return cid

    def give_back(self, cid: str) -> None:
        """``cid`` never started training (its worker was busy or gone): pending again, next."""
        self.running.discard(cid)
        if cid not in self.outcomes:
            self.pending.appendleft(cid)

    # -- answers ---------------------------------------------------------------------------

    def awaited(self, cid: str) -> bool:
        """Whether an answer for ``cid`` would still count in this round."""
        return cid in self.running and cid not in self.outcomes

    def answered(self, cid: str, update: ClientUpdate | bytes | bytearray | memoryview) -> None:
        """``cid``'s worker answered with ``update`` (or its encoded bytes)."""
        if not self.awaited(cid):
            logger.debug("round %d: an answer for %s that is not awaited; ignored",
                         self.round_num, cid)
            return
        if not isinstance(update, ClientUpdate):
            try:
                update = decode_update(update)
            except Exception as exc:  # WireError, or whatever hostile bytes provoke
                self._resolve(ClientFailure(cid, f"malformed update: {exc}", "malformed"))
                return
        if update.client_id != cid:
            self._resolve(ClientFailure(cid, f"the worker answered for {update.client_id!r}",
                                        "malformed"))
            return
        self._resolve(update)

    def raised(self, cid: str, traceback: str) -> None:
        """``cid``'s local training raised; ``traceback`` is its text.

        Raises:
            ClientTrainingError: in strict mode.
        """
        if not self.awaited(cid):
            return
        if self.strict:
            raise ClientTrainingError(cid, self.round_num, traceback)
        self._resolve(ClientFailure(cid, traceback, "raised"))

    def died(self, cid: str, how: str) -> bool:
        """The process training ``cid`` died (``how``); True when ``cid`` is retried."""
        if not self.awaited(cid):
            return False
        self.deaths[cid] = deaths = self.deaths.get(cid, 0) + 1
        if deaths >= ATTEMPTS:
            self._resolve(ClientFailure(
                cid, f"the worker training it died {deaths} times ({how} the last time)", "died"))
            return False
        logger.warning("round %d: the worker training %s died (%s); %s is retried",
                       self.round_num, cid, how, cid)
        self.give_back(cid)
        return True

    def failed(self, cid: str, reason: str, kind: str = "failed") -> None:
        """``cid`` gives no update this round, for ``reason`` (not connected, busy, ...)."""
        if cid in self.outcomes:
            return
        self.running.discard(cid)
        if cid in self.pending:
            self.pending.remove(cid)
        self._resolve(ClientFailure(cid, reason, kind))

    # -- the deadline ----------------------------------------------------------------------

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline; never below 0)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def expire(self) -> list[str]:
        """The deadline passed: every client without an outcome fails. Returns the clients
        that were running (their workers may never answer: the runtime may stop them)."""
        timeout = f"round_timeout={self.round_timeout:g}s" if self.round_timeout else "the deadline"
        running = [cid for cid in self.client_ids if cid in self.running and cid not in self.outcomes]
        for cid in running:
            self._resolve(ClientFailure(cid, f"no update within {timeout}", "timeout"))
        for cid in list(self.pending):
            self._resolve(ClientFailure(cid, f"not trained within {timeout}", "timeout"))
        self.pending.clear()
        return running

    # -- the end ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return len(self.outcomes) == self._wanted

    def results(self) -> list[Outcome]:
        """The outcomes, in the order of the round's clients."""
        return [self.outcomes[cid] for cid in self.client_ids]

    def _resolve(self, outcome: Outcome) -> None:
        self.running.discard(outcome.client_id)
        self.outcomes[outcome.client_id] = outcome
