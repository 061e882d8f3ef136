"""Personal evaluation: which clients evaluate their personal models on their local test sets,
and the round metrics their answers make (``personal_accuracy`` and its spread).

The trainer sends the evaluation as a round of its own (``{TASK: EVALUATE}`` in its values)
through the runtime, so it runs wherever the clients' data lives, in every runtime (which
tell a round's evaluation from its training by the ``train`` call, not the round number).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from oiafed.core.types import ClientUpdate, Outcome
from oiafed.exceptions import ConfigError
from oiafed.registry import get
from oiafed.seeding import PERSONAL, rng

logger = logging.getLogger(__name__)

EVAL_CHUNK = 64
"""Fewest clients one runtime call of a personal evaluation asks (a round's sample if more):
their personal state and tasks are what the evaluation holds in memory at once."""
COSTLY_SHARE, COSTLY_CLIENTS = 10, 100
"""Evaluating all clients warns beyond ``COSTLY_SHARE`` times a round's sample and
``COSTLY_CLIENTS`` clients."""


def check_learner(learner_type: str) -> None:
    """Refuse a learner class without ``evaluate_personal`` (from oiafed's ``Learner``).

    Raises:
        ConfigError: naming ``learner.type``.
    """
    learner = get("learner", learner_type, path="learner.type")
    if isinstance(learner, type) and not hasattr(learner, "evaluate_personal"):
        raise ConfigError(f"{learner.__name__} has no evaluate_personal() (from oiafed's "
                          "Learner) for personal evaluation (data.local_test_fraction)",
                          "learner.type")


def warn_if_costly(total: int, sampled: int, eval_every: int) -> None:
    """One warning when evaluating all ``total`` clients every ``eval_every`` rounds asks
    far more clients than a round trains (``sampled``)."""
    if total > COSTLY_SHARE * sampled and total > COSTLY_CLIENTS:
        logger.warning("personal evaluation asks all %d clients every %d round(s), a round "
                       "trains %d: set trainer.args.personal_eval_clients to evaluate a fixed "
                       "sample, or raise trainer.args.eval_every", total, eval_every, sampled)


def evaluation_clients(client_ids: Sequence[str], count: int | None, seed: int) -> list[str]:
    """The clients every personal evaluation of the run asks: all of them, or ``count`` drawn
    once from the seed (the same ones each time, in index order). O(count) for a small share
    of a large federation."""
    total = len(client_ids)
    if count is None or count >= total:
        return list(client_ids)
    picked = rng(seed, PERSONAL).choice(total, size=count, replace=False)
    return [client_ids[int(i)] for i in sorted(picked)]


def answer_problem(outcome: Outcome) -> str | None:
    """Why ``outcome`` is no usable personal evaluation (None: it is): a failure, or an
    answer with test samples but no ``accuracy`` in [0, 1] or no finite ``loss``."""
    if not isinstance(outcome, ClientUpdate):
        return outcome.error
    accuracy, loss = outcome.metrics.get("accuracy"), outcome.metrics.get("loss")
    if outcome.num_samples == 0:
        return None
    if accuracy is None or not 0 <= accuracy <= 1 or loss is None or not math.isfinite(loss):
        return f"accuracy {accuracy!r} and loss {loss!r} are not an evaluation's"
    return None


def personal_metrics(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """The round metrics of one evaluation's ``scores`` (client id -> ``accuracy``, ``loss``,
    ``num_samples``): sample-weighted ``personal_accuracy`` and ``personal_loss``, the
    clients' ``personal_accuracy_min``, ``_p10`` and ``_median``, and ``personal_clients``
    (clients with a local test set, each counted once)."""
    rows = [row for row in scores.values() if row["num_samples"] > 0]
    total = sum(row["num_samples"] for row in rows)
    if not rows:
        return {"personal_clients": 0}
    accuracies = np.array([row["accuracy"] for row in rows])
    return {
        "personal_accuracy": sum(r["accuracy"] * r["num_samples"] for r in rows) / total,
        "personal_loss": sum(r["loss"] * r["num_samples"] for r in rows) / total,
        "personal_accuracy_min": float(accuracies.min()),
        "personal_accuracy_p10": float(np.percentile(accuracies, 10)),
        "personal_accuracy_median": float(np.median(accuracies)),
        "personal_clients": len(rows),
    }
