"""The round loop. Every trainer-level hook fires in this file (epoch hooks: ``learner.py``)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from oiafed.attacks import Attack
from oiafed.callbacks.base import CallbackManager
from oiafed.core.aggregators import Aggregator
from oiafed.core.client_states import ClientStates
from oiafed.core.evaluation import evaluate
from oiafed.core.learner import EPOCHS, EVALUATE, TASK
from oiafed.core.personal_eval import (
    EVAL_CHUNK,
    answer_problem,
    check_learner,
    evaluation_clients,
    personal_metrics,
    warn_if_costly,
)
from oiafed.core.types import (
    ClientFailure,
    ClientTask,
    ClientUpdate,
    Outcome,
    RoundContext,
    RoundResult,
    RoundTask,
    SecureSum,
    TrainResult,
    Weights,
)
from oiafed.core.validation import (
    model_is_finite,
    nonfinite_problems,
    update_problem,
    value_problems,
    weights_problem,
)
from oiafed.core.weights import load_weights
from oiafed.data.arrays import ArrayDataset
from oiafed.data.federated import ClientIds, id_set
from oiafed.exceptions import ConfigError, RoundFailed, SelectionError
from oiafed.privacy.base import Privacy, secure_seed
from oiafed.registry import register
from oiafed.runtime.base import RunEnd, RunSpec, Runtime
from oiafed.runtime.envelope import json_problem
from oiafed.seeding import ATTACK, PERSONAL, SAMPLING, STRAGGLERS, TRAIN, derive_seed, rng

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig

logger = logging.getLogger(__name__)

__all__ = ["RoundFailed", "RoundRecorder", "SelectionError", "Trainer"]


class RoundRecorder(Protocol):
    """Receives what each round did as soon as it is known (the run folder): a ``client_row``
    for each client sampled in the round, then the round's history row."""

    def record_clients(self, rows: list[dict[str, Any]]) -> None: ...

    def record_round(self, trainer: Trainer, row: dict[str, Any]) -> None: ...


def client_row(round_num: int, outcome: Outcome, problem: str | None) -> dict[str, Any]:
    """One sampled client in one round: ``round``, ``client_id``, then ``num_samples`` and
    the update's metrics (``accuracy``, ``loss``, ``time``, ...) when it sent one, and the last
    line of ``problem`` as ``error`` when it was left out."""
    row: dict[str, Any] = {"round": round_num, "client_id": outcome.client_id}
    if isinstance(outcome, ClientUpdate):
        row["num_samples"] = outcome.num_samples
        row.update(outcome.metrics)
        # A metric of these names must not replace them (the keys keep their places).
        row.update(round=round_num, client_id=outcome.client_id, num_samples=outcome.num_samples)
    if problem is not None:
        row["error"] = _last_line(problem)
    return row


def _clients_in(update: ClientUpdate) -> int:
    """How many clients' updates ``update`` holds (a ``SecureSum``: its members)."""
    return len(update.members) if isinstance(update, SecureSum) else 1


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no update"


@register("trainer.default")
class Trainer:
    """Runs federated rounds: select clients, train them, aggregate, evaluate, call back.

    Control fields callbacks may set:
        should_stop: training ends after the current round; stays set once set. The callback
            that set it is recorded as ``stopped_by``; it may explain why in ``stop_reason``.
        client_selection_weights: dict client id -> weight >= 0 steering the *next* selection
            (sampling without replacement, proportional to weight; ids left out get weight 0).
            The trainer clears it after using it, so a callback sets it each round it wants it.
        fit_config: per-round settings sent to every learner; kept. ``run`` puts the
            learner's ``lr`` here, so a callback changes the learning rate by setting it.

    Also there for callbacks: ``model`` (the global model), ``round_num``, ``rounds``,
    ``client_ids``, ``config`` (the ``ExperimentConfig``), ``history`` and ``run_dir``
    (the run folder, where relative paths of callbacks resolve; None outside ``run``), and
    ``device``: where the global model lives, is evaluated and aggregated (the config's
    ``device``; the clients' updates are moved there before aggregation), and ``privacy``:
    the ``privacy:`` section's server side (``epsilon_spent()``, ``epsilon_next()``), or None.

    Args:
        rounds: number of rounds.
        clients_per_round: clients sampled per round (default: all); or
        fraction: the fraction of clients sampled per round (at least one).
        eval_every: evaluate the global model every this many rounds (and at the last round).
        min_clients: the quorum: a round with fewer usable updates fails the run.
        round_timeout: seconds a runtime waits for a round's clients before it gives up on
            the missing ones (None: no limit; runtimes with remote clients read it).
        straggler_fraction: systems heterogeneity as in the FedProx paper (Li et al., MLSys
            2020, Section 5.2): this share of each round's clients (drawn from the seed) does a
            number of local epochs drawn uniformly from 1..E (E: the learner's ``epochs``);
            an aggregator may drop them (``fedavg``'s ``drop_stragglers``) or use their
            partial work.
        max_update_norm_ratio: an update farther (L2, over the floating-point weights) from
            the round's global model than this many times the median distance of the round's
            updates is a bad update, left out (None: no bound). It bounds absurd updates only:
            robust aggregators are the defence against subtler ones.
        personal_eval_clients: with local test sets (``data.local_test_fraction``), how many
            clients evaluate their personal models on every evaluated round: a sample drawn
            once from the seed (None: all; set it for large federations).

    YAML:
        trainer:
          type: default
          args: {rounds: 30, clients_per_round: 5, eval_every: 1}
    """

    def __init__(
        self,
        rounds: int = 10,
        clients_per_round: int | None = None,
        fraction: float | None = None,
        eval_every: int = 1,
        min_clients: int = 1,
        round_timeout: float | None = None,
        straggler_fraction: float = 0.0,
        max_update_norm_ratio: float | None = 1000.0,
        personal_eval_clients: int | None = None,
    ) -> None:
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        if clients_per_round is not None and fraction is not None:
            raise ConfigError("set clients_per_round or fraction, not both")
        if clients_per_round is not None and clients_per_round < 1:
            raise ConfigError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
        if eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {eval_every}")
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        if round_timeout is not None and round_timeout <= 0:
            raise ConfigError(f"round_timeout must be > 0 seconds, got {round_timeout}")
        if not 0 <= straggler_fraction <= 1:
            raise ConfigError(f"must be in [0, 1], got {straggler_fraction}",
                              "trainer.args.straggler_fraction")
        if max_update_norm_ratio is not None and not max_update_norm_ratio >= 1:
            raise ConfigError(f"must be >= 1 (or null: no bound), got {max_update_norm_ratio}",
                              "trainer.args.max_update_norm_ratio")
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.fraction = fraction
        self.eval_every = eval_every
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.straggler_fraction = straggler_fraction
        self.max_update_norm_ratio = max_update_norm_ratio
        if personal_eval_clients is not None and personal_eval_clients < 1:
            raise ConfigError(f"must be >= 1 (or null: all clients), got {personal_eval_clients}",
                              "trainer.args.personal_eval_clients")
        self.personal_eval_clients = personal_eval_clients
        self.personal_evaluation = False
        """Whether evaluated rounds evaluate personal models (``bind``: the clients have
        local test sets)."""
        self.personal_scores: dict[str, dict[str, float]] = {}
        """The last personal evaluation: client id -> ``accuracy``, ``loss``, ``num_samples``."""
        self.local_epochs = 1
        """E for stragglers: the learner's ``epochs`` (``run`` sets it)."""
        self.client_states = ClientStates()
        """The per-client state of the algorithm's server half (resumable in a run folder)."""
        self.attack: Attack | None = None
        self.privacy: Privacy | None = None
        """The ``privacy:`` section's server side (set before ``bind``)."""
        self.attacked: frozenset[str] = frozenset()
        """The clients the ``attack`` controls (fixed for the run)."""
        self.round_num = 0
        self.should_stop = False
        self.stopped_by: str | None = None
        self.stop_reason: str | None = None
        self.client_selection_weights: dict[str, float] | None = None
        self.fit_config: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.model: nn.Module = nn.Module()  # the global model, from ``bind``
        self.device = torch.device("cpu")
        self.aggregator: Aggregator | None = None
        self.runtime: Runtime | None = None
        self.callbacks = CallbackManager()
        self.test_data: ArrayDataset | None = None
        self.client_ids: Sequence[str] = []
        self.seed = 0
        self.config: ExperimentConfig | None = None
        self.recorder: RoundRecorder | None = None
        self.run_dir: Path | None = None
        self._client_set: Container[str] = frozenset()
        self._in_round = False
        self._index_of: Callable[[str], int] = self._position
        self._positions: dict[str, int] | None = None
        self._parameters: tuple[str, ...] | None = None
        self._client_size: Callable[[str], int] | None = None
        self._first_counts: dict[str, int] = {}
        """Without ``client_size``: each client's ``num_samples`` in its first accepted update."""

    def bind(
        self,
        *,
        model: nn.Module,
        aggregator: Aggregator,
        runtime: Runtime,
        callbacks: CallbackManager,
        test_data: ArrayDataset | None,
        client_ids: Sequence[str],
        seed: int,
        config: ExperimentConfig | None = None,
        recorder: RoundRecorder | None = None,
        index_of: Callable[[str], int] | None = None,
        attack: Attack | None = None,
        client_size: Callable[[str], int] | None = None,
    ) -> Trainer:
        """Attach what a run provides: the global model, clients, runtime and callbacks.

        ``index_of`` gives a client's position in ``client_ids`` (it derives the client's
        training seed); default: ``ClientIds.index``, or for other id lists a lookup table
        built on first use. ``attack`` simulates Byzantine clients. ``client_size`` gives a
        client's number of training samples where the server knows it (a simulation): an
        update declaring more ``num_samples`` is a bad update. Without it (a deployment, where
        clients may bring their own data), a client may never declare more than in its first
        accepted update.

        Raises:
            ConfigError: for an empty federation, or arguments of the aggregator or attack
                this federation cannot honour.
        """
        if not client_ids:
            raise ConfigError("a federation needs at least one client")
        self.model = model
        self._parameters = None
        self.aggregator = aggregator
        self.runtime = runtime
        self.callbacks = callbacks
        self.test_data = test_data
        self.client_ids = client_ids
        self._client_set = id_set(client_ids)
        self.seed = seed
        self.config = config
        self.recorder = recorder
        self._index_of = index_of or self._position
        self.attack = attack
        self.attacked = attack.choose(client_ids, seed) if attack is not None else frozenset()
        self._client_size = client_size
        self._first_counts = {}
        aggregator.check_federation(len(client_ids), self.num_sampled)
        if self.privacy is not None:
            self.privacy.bind(len(client_ids), self.num_sampled, seed)
            if self.privacy.uniform_sampling and self.max_update_norm_ratio is not None:
                logger.info("central privacy: the update-norm filter (max_update_norm_ratio) "
                            "is off; clipping bounds every update")
                self.max_update_norm_ratio = None
        aggregator.check_model(model)
        self.personal_evaluation = config is not None and config.data.local_test_fraction > 0
        if config is not None and self.personal_evaluation:
            check_learner(config.learner.type)
            if self.personal_eval_clients is None:
                warn_if_costly(len(client_ids), self.num_sampled, self.eval_every)
        self._warn_clamped()
        return self

    def _warn_clamped(self) -> None:
        """A warning for a sample size this federation cannot give as set (likely a mistake)."""
        total = len(self.client_ids)
        if self.clients_per_round is not None and self.clients_per_round > total:
            logger.warning("trainer.args.clients_per_round is %d but the federation has %d "
                           "clients (data.num_clients): each round samples all %d",
                           self.clients_per_round, total, total)
        elif self.fraction is not None and round(self.fraction * total) < 1:
            logger.warning("trainer.args.fraction %g of %d clients rounds to 0: each round "
                           "samples 1 client", self.fraction, total)

    def _position(self, client_id: str) -> int:
        if isinstance(self.client_ids, ClientIds):
            try:
                return self.client_ids.index(client_id)
            except ValueError:
                raise KeyError(client_id) from None
        if self._positions is None:
            self._positions = {cid: i for i, cid in enumerate(self.client_ids)}
        return self._positions[client_id]

    def _bound(self) -> tuple[Aggregator, Runtime]:
        if self.aggregator is None or self.runtime is None:
            raise RuntimeError("Trainer.bind() must be called before training")
        return self.aggregator, self.runtime

    @property
    def num_sampled(self) -> int:
        """How many clients each round samples."""
        total = len(self.client_ids)
        if self.clients_per_round is not None:
            return min(self.clients_per_round, total)
        if self.fraction is not None:
            return max(1, round(self.fraction * total))
        return total

    def run_spec(self) -> RunSpec:
        """What the runtime is told of this run."""
        strict = self.config.strict if self.config is not None else self.callbacks.strict
        return RunSpec(client_ids=self.client_ids, num_sampled=self.num_sampled,
                       min_clients=self.min_clients, round_timeout=self.round_timeout,
                       run_dir=self.run_dir, config=self.config, strict=strict)

    async def fit(self, *, until: int | None = None) -> TrainResult:
        """Run every round (or until ``should_stop``, or round ``until``); return the
        ``TrainResult``.

        A run that ends by an exception (``KeyboardInterrupt`` included) calls every
        callback's ``on_exception``, closes the runtime, then raises it again.
        """
        started = time.perf_counter()
        last = self.rounds if until is None else until
        _, runtime = self._bound()
        try:
            await runtime.start(self.run_spec())
            await self.callbacks.on_train_start(self)
            while self.round_num < last and not self.should_stop:
                await self.run_round(self.round_num + 1)
        except BaseException as exc:
            await self._fail(exc)
            raise
        await runtime.close(RunEnd(ok=True, reason=self._stop_reason()))
        result = self.result(wall_time=time.perf_counter() - started)
        await self.callbacks.on_train_end(self, result)
        result.callback_errors = [e.to_dict() for e in self.callbacks.errors]
        return result

    def result(self, *, stop_reason: str | None = None, wall_time: float = 0.0) -> TrainResult:
        """The ``TrainResult`` of the rounds completed so far."""
        return TrainResult(
            rounds_completed=self.round_num - 1 if self._in_round else self.round_num,
            history=self.history,
            stop_reason=stop_reason or self._stop_reason(),
            stopped_by=self.stopped_by if self.should_stop else None,
            callback_errors=[e.to_dict() for e in self.callbacks.errors],
            weights={k: v.cpu() for k, v in self.model.state_dict().items()},
            wall_time=wall_time,
        )

    async def _fail(self, exc: BaseException) -> None:
        """Tell the callbacks (``on_exception``), then close the runtime; never masks ``exc``."""
        shown = KeyboardInterrupt() if isinstance(exc, asyncio.CancelledError) else exc
        try:
            await self.callbacks.on_exception(self, shown)
        except Exception:  # strict mode re-raises a callback's error: the run's own comes first
            logger.exception("a callback's on_exception raised")
        reason = ("interrupted" if isinstance(shown, KeyboardInterrupt)
                  else f"failed in round {self.round_num}: {type(exc).__name__}: {exc}")
        if self.runtime is not None:
            try:
                await self.runtime.close(RunEnd(ok=False, reason=reason))
            except Exception:
                logger.exception("closing the runtime after the failure raised")

    async def run_round(self, round_num: int) -> RoundResult:
        """One round: select, train, aggregate, evaluate; every round hook fires here."""
        aggregator, runtime = self._bound()
        started = time.perf_counter()
        self.round_num = round_num
        self._in_round = True
        await self.callbacks.on_round_start(self, round_num)
        for client_id in runtime.take_joins():
            await self.callbacks.on_client_join(self, client_id)
        selected = self.select_clients(round_num)
        global_weights = self.model.state_dict()
        problem = json_problem(self.fit_config)
        if problem is not None:
            raise ConfigError(f"must hold JSON values to reach the learners: {problem}",
                              "trainer.fit_config")
        stragglers = self.stragglers(round_num, selected)
        attacked = frozenset(c for c in selected if c in self.attacked) if self.attacked else frozenset()
        self.client_states.round = round_num
        aggregator.context = RoundContext(round_num, tuple(selected), len(self.client_ids),
                                          self.client_states, frozenset(stragglers), attacked,
                                          dict(self.fit_config), self._parameter_names())
        plan = aggregator.configure_round(global_weights)
        problem = json_problem(plan.values) or next(
            (p for v in plan.client_values.values() if (p := json_problem(v))), None)
        if problem is not None:
            raise ConfigError(f"{type(aggregator).__name__}.configure_round must send JSON "
                              f"values: {problem}", "aggregator.type")
        task = RoundTask(round_num, global_weights, dict(self.fit_config), plan.tensors,
                         plan.values)
        attack_values = self.attack.client_values() if self.attack is not None else {}
        clients = []
        for cid in selected:
            values = plan.client_values.get(cid, {})
            if cid in stragglers:
                values = {**values, EPOCHS: stragglers[cid]}
            if attack_values and cid in attacked:
                values = {**values, **attack_values}
            clients.append(ClientTask(
                cid, derive_seed(self.seed, TRAIN, round_num, self._index_of(cid)),
                plan.client_tensors.get(cid, {}), values))
        deadline = None if self.round_timeout is None else time.monotonic() + self.round_timeout
        outcomes = await runtime.train(task, clients, deadline)
        for client_id in runtime.take_joins():
            await self.callbacks.on_client_join(self, client_id)
        if self.privacy is not None:
            self.privacy.observe(round_num, outcomes)
        updates = await self.accept(round_num, outcomes, global_weights)
        if attacked:
            self._apply_attack(round_num, updates, attacked, global_weights)
        if self.device.type != "cpu":
            for update in updates:
                update.move_to(self.device)
        await self.callbacks.on_aggregate_start(self, updates)
        weights = aggregator.aggregate(
            updates if self.privacy is None
            else self.privacy.prepare(round_num, updates, global_weights), global_weights)
        await self.callbacks.on_aggregate_end(self, weights)
        if not model_is_finite(weights):  # never loaded: the last good round stays (and state)
            problem = nonfinite_problems([weights])[0]
            raise RoundFailed(f"round {round_num}: the aggregated global model is not finite "
                              f"({problem}); it was not loaded")
        load_weights(self.model, weights)
        metrics = self.round_metrics(round_num, updates, started)
        if self.personal_evaluation and (round_num % self.eval_every == 0
                                         or round_num == self.rounds):
            evaluated = time.perf_counter()
            metrics.update(await self.evaluate_personal(round_num))
            metrics["personal_eval_time"] = time.perf_counter() - evaluated
        result = RoundResult(round_num, metrics, updates)
        await self.callbacks.on_round_end(self, round_num, result)
        row = {"round": round_num, **result.metrics}
        self.history.append(row)
        self._in_round = False
        if self.recorder is not None:
            self.recorder.record_round(self, row)
        else:
            self.client_states.collect(round_num)
        return result

    async def evaluate_personal(self, round_num: int) -> dict[str, float]:
        """Every evaluated client's personal model (``aggregator.evaluation_plan``, built by
        its learner where its data lives) on its local test set; the round's ``personal_*``
        metrics (``core/personal_eval.py``). The clients are asked in chunks of
        ``max(num_sampled, EVAL_CHUNK)`` (each a runtime call with its own deadline), so the
        personal state and tasks held at once stay O(chunk). A client that fails is left out,
        with one warning per evaluation, and counted in ``personal_eval_failed``."""
        clients = evaluation_clients(self.client_ids, self.personal_eval_clients, self.seed)
        weights = self.model.state_dict()
        size = max(self.num_sampled, EVAL_CHUNK)
        self.personal_scores = {}
        failed: list[tuple[str, str]] = []
        for start in range(0, len(clients), size):
            for outcome in await self._evaluate_chunk(round_num, clients[start:start + size],
                                                      weights):
                problem = answer_problem(outcome)
                if problem is not None or not isinstance(outcome, ClientUpdate):
                    failed.append((outcome.client_id, _last_line(problem or "no answer")))
                    continue
                self.personal_scores[outcome.client_id] = {
                    "accuracy": outcome.metrics["accuracy"], "loss": outcome.metrics["loss"],
                    "num_samples": outcome.num_samples}
        if failed:
            logger.warning("round %d: personal evaluation left out %d of %d client(s); %s: %s",
                           round_num, len(failed), len(clients), *failed[0])
        return {**personal_metrics(self.personal_scores), "personal_eval_failed": len(failed)}

    async def _evaluate_chunk(self, round_num: int, clients: list[str],
                              weights: Weights) -> Sequence[Outcome]:
        """One runtime call evaluating ``clients``' personal models."""
        aggregator, runtime = self._bound()
        aggregator.context = RoundContext(round_num, tuple(clients), len(self.client_ids),
                                          self.client_states, fit_config=dict(self.fit_config),
                                          parameter_names=self._parameter_names())
        plan = aggregator.evaluation_plan(weights)
        task = RoundTask(round_num, weights, dict(self.fit_config),
                         plan.tensors, {**plan.values, TASK: EVALUATE})
        tasks = [ClientTask(cid, derive_seed(self.seed, PERSONAL, round_num, self._index_of(cid)),
                            plan.client_tensors.get(cid, {}), plan.client_values.get(cid, {}))
                 for cid in clients]
        deadline = None if self.round_timeout is None else time.monotonic() + self.round_timeout
        return await runtime.train(task, tasks, deadline)

    def _parameter_names(self) -> tuple[str, ...]:
        if self._parameters is None:
            self._parameters = tuple(name for name, p in self.model.named_parameters()
                                     if p.is_floating_point())
        return self._parameters

    def stragglers(self, round_num: int, selected: list[str]) -> dict[str, int]:
        """The round's stragglers and the local epochs each does (``straggler_fraction`` of
        ``selected``, epochs uniform in 1..E, all from the round's own seed)."""
        count = round(self.straggler_fraction * len(selected))
        if not count:
            return {}
        gen = rng(self.seed, STRAGGLERS, round_num)
        picked = sorted(gen.choice(len(selected), size=count, replace=False))
        epochs = gen.integers(1, self.local_epochs + 1, size=count)
        return {selected[int(i)]: int(e) for i, e in zip(picked, epochs, strict=True)}

    def _apply_attack(self, round_num: int, updates: list[ClientUpdate],
                      attacked: frozenset[str], global_weights: Weights) -> None:
        """What the attacked clients send instead of their honest updates (marked)."""
        assert self.attack is not None
        bad = [u for u in updates if u.client_id in attacked]
        good = [u for u in updates if u.client_id not in attacked]
        for update in bad:
            update.attacked = True
        generator = torch.Generator().manual_seed(derive_seed(self.seed, ATTACK, round_num))
        self.attack.apply(bad, good, global_weights, generator)

    def round_metrics(self, round_num: int, updates: list[ClientUpdate],
                      started: float) -> dict[str, float]:
        """The round's metrics: the clients' sample-weighted training metrics, the global
        model's on the test set on evaluated rounds, and ``round_time`` (since ``started``,
        a ``time.perf_counter()``). Under ``privacy:`` only the client count is kept of the
        training metrics: the clients' losses, accuracies and sample counts are not noised."""
        metrics = self.train_metrics(updates)
        if self.privacy is not None:
            metrics = {"num_clients": metrics["num_clients"]}
        if self.test_data is not None and (round_num % self.eval_every == 0
                                           or round_num == self.rounds):
            metrics.update(evaluate(self.model, self.test_data, device=self.device))
        if self.privacy is not None:
            metrics.update(self.privacy.round_metrics(round_num))
        metrics["round_time"] = time.perf_counter() - started
        return metrics

    async def accept(self, round_num: int, outcomes: Sequence[Outcome],
                     reference: Weights) -> list[ClientUpdate]:
        """The updates fit to aggregate. Failed clients and bad updates are logged, reported
        to ``on_client_failure`` and left out.

        Bad updates: of another form than ``reference`` or the aggregator expects, declaring
        more ``num_samples`` than the client has (``bind``'s ``client_size``), holding
        non-finite values, or farther from ``reference`` than ``max_update_norm_ratio``
        allows.

        A ``SecureSum`` (secure aggregation) counts as its members; its members' sample
        counts cannot be checked one by one (the server never sees them).

        Raises:
            RoundFailed: when fewer than ``min_clients`` usable updates remain.
        """
        extras_check = (self.aggregator.update_problem if self.aggregator is not None
                        else lambda update, reference: None)
        privacy_check = (self.privacy.update_problem if self.privacy is not None
                         else lambda update: None)
        problems: list[str | None] = [
            outcome.error if isinstance(outcome, ClientFailure)
            else (update_problem(outcome, reference) or extras_check(outcome, reference)
                  or (None if isinstance(outcome, SecureSum)
                      else self._count_problem(outcome) or privacy_check(outcome)))
            for outcome in outcomes
        ]
        well_formed = [i for i, problem in enumerate(problems) if problem is None]
        found = value_problems(
            [o.weights for i in well_formed if isinstance(o := outcomes[i], ClientUpdate)],
            reference, self.max_update_norm_ratio)
        for i, problem in zip(well_formed, found, strict=True):
            problems[i] = problem
        if self.recorder is not None:
            self.recorder.record_clients([
                row for outcome, problem in zip(outcomes, problems, strict=True)
                for row in (  # a secure sum: the server knows only who took part
                    [{"round": round_num, "client_id": cid} for cid in outcome.members]
                    if isinstance(outcome, SecureSum) and problem is None
                    else [client_row(round_num, outcome, problem)])])
        accepted, rejected = [], []
        for outcome, problem in zip(outcomes, problems, strict=True):
            if problem is None and isinstance(outcome, ClientUpdate):
                accepted.append(outcome)
                if self._client_size is None:
                    self._first_counts.setdefault(outcome.client_id, outcome.num_samples)
                continue
            problem = problem or "no update"
            last = _last_line(problem)
            rejected.append(f"{outcome.client_id}: {last}")
            # The reason first, on the first line; a traceback after it (the console shows
            # the first line while a run log takes the rest), each of its lines marked, so
            # text a remote client sent cannot pass for a log line of its own.
            detail = ("".join(f"\n  | {line}" for line in problem.rstrip().splitlines())
                      if problem.strip() != last else "")
            logger.warning("round %d: left out %s: %s%s", round_num, outcome.client_id, last,
                           detail)
            await self.callbacks.on_client_failure(self, outcome.client_id, problem)
        usable = sum(_clients_in(u) for u in accepted)
        if usable < self.min_clients:
            raise RoundFailed(
                f"round {round_num}: {usable} usable client update(s), fewer than "
                f"min_clients={self.min_clients} ({'; '.join(rejected) or 'no client answered'})"
            )
        return accepted

    def _count_problem(self, update: ClientUpdate) -> str | None:
        """Why ``update``'s ``num_samples`` (its weight in FedAvg) cannot be believed: more than
        the client's training samples, or, where the server does not know them, more than in
        its first accepted update (None: it can)."""
        if self._client_size is not None:
            size = self._client_size(update.client_id)
            if update.num_samples > size:
                return (f"num_samples {update.num_samples} is more than the {size} training "
                        "samples it has")
            return None
        first = self._first_counts.get(update.client_id)
        if first is not None and update.num_samples > first:
            return (f"num_samples {update.num_samples} is more than the {first} of its first "
                    "accepted update")
        return None

    def select_clients(self, round_num: int) -> list[str]:
        """This round's clients, drawn without replacement from the round's own seed (from
        the OS CSPRNG under ``privacy.args.secure_rng``: the accountant's sampling is secret).

        O(k) for k sampled of n clients when k <= n / 50 or n <= 10,000: NumPy's ``choice``
        then uses Floyd's algorithm (measured: 100 of 100 or of 10,000,000 both take ~25 us).
        A larger share shuffles the n indices, O(n) < O(50 k). Weighted selection costs
        O(number of weights given).
        """
        weights, self.client_selection_weights = self.client_selection_weights, None
        k = self.num_sampled
        if weights is not None and self.privacy is not None and self.privacy.uniform_sampling:
            raise SelectionError("client_selection_weights cannot steer the selection under "
                                 "privacy.type central: its accountant assumes uniform sampling")
        if weights is not None:
            ids, probs = self._selection_probabilities(weights)
            gen = rng(self.seed, SAMPLING, round_num)
            picked = gen.choice(len(ids), size=min(k, len(ids)), replace=False, p=probs)
            return [ids[i] for i in sorted(picked)]
        total = len(self.client_ids)
        if k == total:
            return list(self.client_ids)
        gen = (np.random.default_rng(secure_seed())
               if self.privacy is not None and self.privacy.secure_rng
               else rng(self.seed, SAMPLING, round_num))
        return [self.client_ids[i] for i in sorted(gen.choice(total, size=k, replace=False))]

    def _selection_probabilities(self, weights: Any) -> tuple[list[str], np.ndarray]:
        if not isinstance(weights, dict):
            raise SelectionError(
                f"client_selection_weights must be a dict client_id -> weight, got "
                f"{type(weights).__name__}"
            )
        ids, values = [], []
        for cid, weight in weights.items():
            if cid not in self._client_set:
                raise SelectionError(f"client_selection_weights names unknown client {cid!r}")
            if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
                raise SelectionError(
                    f"client_selection_weights[{cid!r}] must be a finite number >= 0, got {weight!r}"
                )
            if weight > 0:
                ids.append(cid)
                values.append(float(weight))
        if not ids:
            raise SelectionError("client_selection_weights gives every client weight 0")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        probs = np.array([values[i] for i in order])
        return [ids[i] for i in order], probs / probs.sum()

    @staticmethod
    def train_metrics(updates: list[ClientUpdate]) -> dict[str, float]:
        """Sample-weighted local ``train_accuracy``/``train_loss``, client and sample counts."""
        total = sum(u.num_samples for u in updates)
        metrics: dict[str, float] = {"num_clients": sum(map(_clients_in, updates)),
                                     "num_samples": total}
        for name in ("accuracy", "loss"):
            weighted = [(u.metrics.get(name, math.nan), u.num_samples)
                        for u in updates if u.num_samples]
            metrics[f"train_{name}"] = (
                sum(float(v) * n for v, n in weighted) / total if total else math.nan
            )
        return metrics

    def state_dict(self, include_history: bool = True) -> dict[str, Any]:
        """Everything needed to continue exactly after the current round.

        Client sampling and local data order need no state: they are derived from
        ``(seed, round)``, so a resumed run draws what an uninterrupted one would. Without
        ``include_history`` the history is None (the run folder keeps it in metrics.jsonl,
        so a state saved every round does not grow with the number of rounds). As with
        ``Module.state_dict``, tensors are the live ones: copy them to keep a snapshot.
        """
        return {
            "round_num": self.round_num,
            "weights": self.model.state_dict(),
            "aggregator": self._bound()[0].state_dict(),
            "callbacks": self.callbacks.state_dict(),
            "should_stop": self.should_stop,
            "stopped_by": self.stopped_by,
            "stop_reason": self.stop_reason,
            "fit_config": dict(self.fit_config),
            "history": [dict(row) for row in self.history] if include_history else None,
            "privacy": self.privacy.state_dict() if self.privacy is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (after ``bind``).

        Raises:
            ValueError: before anything is changed, when the weights are not the model's
                keys, shapes and dtypes, or hold non-finite values.
        """
        weights = state["weights"]
        problem = weights_problem(weights, self.model.state_dict())
        if problem is None:
            problem = nonfinite_problems([weights])[0]
        if problem is not None:
            raise ValueError(f"the saved weights do not fit the model: {problem}")
        self.model.load_state_dict(weights)
        self._bound()[0].load_state_dict(state["aggregator"])
        self.callbacks.load_state_dict(state["callbacks"])
        self.round_num = state["round_num"]
        self.should_stop = state["should_stop"]
        self.stopped_by = state["stopped_by"]
        self.stop_reason = state["stop_reason"]
        self.fit_config = dict(state["fit_config"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state.get("privacy", {}))
        if state["history"] is not None:
            self.history = [dict(row) for row in state["history"]]

    def _stop_reason(self) -> str:
        if not self.should_stop:
            return "completed"
        if self.stop_reason:
            return self.stop_reason
        return f"should_stop set by {self.stopped_by or 'user code'}"
