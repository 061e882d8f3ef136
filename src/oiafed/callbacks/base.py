"""The callback contract (``Callback``) and the dispatcher that runs callbacks (``CallbackManager``)."""

from __future__ import annotations

import inspect
import logging
from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oiafed import registry
from oiafed.exceptions import CallbackError, ConfigError

if TYPE_CHECKING:
    from oiafed.core.learner import Learner
    from oiafed.core.trainer import Trainer
    from oiafed.core.types import ClientUpdate, RoundResult, TrainResult, Weights

logger = logging.getLogger(__name__)

HOOKS = (
    "on_train_start",
    "on_train_end",
    "on_round_start",
    "on_round_end",
    "on_epoch_start",
    "on_epoch_end",
    "on_aggregate_start",
    "on_aggregate_end",
    "on_client_failure",
    "on_client_join",
    "on_exception",
)


class Callback(ABC):  # noqa: B024 - the seed makes it an ABC whose hooks are all optional
    """Base class of callbacks: override the hooks you need; each does nothing by default.

    Hooks may be ``async def`` or plain ``def``. They receive keyword extras (``**kwargs``) so
    that new context can be passed later without breaking them.
    """

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        """Called once before the first round."""

    async def on_train_end(self, trainer: Trainer, result: TrainResult, **kwargs: Any) -> None:
        """Called once after the last round with the ``TrainResult``."""

    async def on_round_start(self, trainer: Trainer, round_num: int, **kwargs: Any) -> None:
        """Called at the start of each round, before clients are selected."""

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        """Called after each round's evaluation with the ``RoundResult``."""

    async def on_epoch_start(self, learner: Learner, epoch: int, **kwargs: Any) -> None:
        """Called where the learner runs, before each local epoch (epochs start at 1)."""

    async def on_epoch_end(self, learner: Learner, epoch: int, metrics: dict[str, float],
                           **kwargs: Any) -> None:
        """Called where the learner runs, after each local epoch with its metrics."""

    async def on_aggregate_start(self, trainer: Trainer, updates: list[ClientUpdate],
                                 **kwargs: Any) -> None:
        """Called with the round's ``ClientUpdate`` list before aggregation."""

    async def on_aggregate_end(self, trainer: Trainer, weights: Weights, **kwargs: Any) -> None:
        """Called with the new global weights after aggregation."""

    async def on_client_failure(self, trainer: Trainer, client_id: str, error: str,
                                **kwargs: Any) -> None:
        """Called when a sampled client gives no usable update (it is left out of the round);
        ``error`` says why (the traceback text when its training raised)."""

    async def on_client_join(self, trainer: Trainer, client_id: str, **kwargs: Any) -> None:
        """Called when a client process joins (or rejoins) a deployed federation."""

    async def on_exception(self, trainer: Trainer, exception: BaseException,
                           **kwargs: Any) -> None:
        """Called when the run ends by an exception (``KeyboardInterrupt`` included), before
        the teardown; ``on_train_end`` is not called then. Close what ``on_train_end`` would."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a run's saved state (default: its label).

        Override it (e.g. adding the monitored metric) when one config holds two callbacks
        of the same type that both keep state.
        """
        return callback_label(self)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state to save with the run (stateless callbacks return ``{}``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def callback_label(callback: object) -> str:
    """A callback's name in logs and results: its registry name, else its class name."""
    full = registry.name_of(callback)
    return full.split(".", 1)[1] if full else type(callback).__name__


@dataclass(frozen=True)
class CallbackErrorRecord:
    """One exception a callback raised (and that training survived)."""

    callback: str
    hook: str
    error: str
    round_num: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"callback": self.callback, "hook": self.hook, "error": self.error,
                "round": self.round_num}


def overrides(callback: object, hook: str) -> bool:
    """True when ``callback`` implements ``hook`` itself (not the empty base version)."""
    method = getattr(type(callback), hook, None)
    return method is not None and method is not getattr(Callback, hook, None)


class CallbackManager:
    """Runs callbacks in list (config) order, awaiting each hook.

    Hooks nobody overrides cost nothing. A hook that raises is logged with its traceback and
    recorded in ``errors``; training goes on unless ``strict`` is set, in which case the error
    is raised again as ``CallbackError``.

    When a trainer-level hook turns ``trainer.should_stop`` on, the manager records which
    callback did it in ``trainer.stopped_by``.

    Example:
        >>> manager = CallbackManager([EarlyStoppingCallback(patience=3)])
        >>> await manager.on_round_end(trainer, 1, result)
    """

    def __init__(self, callbacks: list[Any] | None = None, *, strict: bool = False) -> None:
        self.callbacks: list[Any] = list(callbacks or [])
        self.strict = strict
        self.errors: list[CallbackErrorRecord] = []
        self._plan = {hook: self._bind(hook) for hook in HOOKS}
        self._stateful = self._stateful_callbacks()

    def _stateful_callbacks(self) -> dict[str, Any]:
        stateful: dict[str, Any] = {}
        for cb in self.callbacks:
            if not callable(getattr(cb, "state_dict", None)) or (
                isinstance(cb, Callback) and type(cb).state_dict is Callback.state_dict
            ):
                continue
            key = getattr(cb, "state_key", None) or callback_label(cb)
            if key in stateful:
                raise ConfigError(
                    f"two callbacks keep state under the key {key!r}; give one a distinct "
                    "state_key so a resumed run can tell them apart", "callbacks"
                )
            stateful[key] = cb
        return stateful

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every stateful callback's ``state_dict()``, by its ``state_key``."""
        return {key: cb.state_dict() for key, cb in self._stateful.items()}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each callback its saved state; saved states no callback claims are logged."""
        for key, state in states.items():
            if key in self._stateful:
                self._stateful[key].load_state_dict(state)
            else:
                logger.warning("saved state of callback %r has no configured callback; ignored",
                               key)

    def _bind(self, hook: str) -> list[tuple[str, Any]]:
        return [
            (callback_label(cb), getattr(cb, hook))
            for cb in self.callbacks
            if overrides(cb, hook) or (not isinstance(cb, Callback) and hasattr(cb, hook))
        ]

    def implements(self, hook: str) -> bool:
        """Whether any callback implements ``hook`` (callers may skip building its arguments)."""
        return bool(self._plan[hook])

    async def call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Run ``hook`` on every callback that implements it, in order."""
        owner = args[0] if args else None
        for label, method in self._plan[hook]:
            was_stopping = getattr(owner, "should_stop", True)
            try:
                outcome = method(*args, **kwargs)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                self._record(label, hook, exc, owner)
            if not was_stopping and getattr(owner, "should_stop", False):
                owner.stopped_by = label  # type: ignore[union-attr]  # owner has should_stop

    def _record(self, label: str, hook: str, exc: Exception, owner: Any) -> None:
        round_num = getattr(owner, "round_num", None)
        self.errors.append(CallbackErrorRecord(label, hook, f"{type(exc).__name__}: {exc}",
                                               round_num if isinstance(round_num, int) else None))
        if self.strict:
            raise CallbackError(label, hook, exc) from exc
        logger.exception("callback %s.%s failed (training goes on)", label, hook)

    async def on_train_start(self, trainer: Trainer, **kwargs: Any) -> None:
        await self.call("on_train_start", trainer, **kwargs)

    async def on_train_end(self, trainer: Trainer, result: TrainResult, **kwargs: Any) -> None:
        await self.call("on_train_end", trainer, result, **kwargs)

    async def on_round_start(self, trainer: Trainer, round_num: int, **kwargs: Any) -> None:
        await self.call("on_round_start", trainer, round_num, **kwargs)

    async def on_round_end(self, trainer: Trainer, round_num: int, result: RoundResult,
                           **kwargs: Any) -> None:
        await self.call("on_round_end", trainer, round_num, result, **kwargs)

    async def on_epoch_start(self, learner: Learner, epoch: int, **kwargs: Any) -> None:
        await self.call("on_epoch_start", learner, epoch, **kwargs)

    async def on_epoch_end(self, learner: Learner, epoch: int, metrics: dict[str, float],
                           **kwargs: Any) -> None:
        await self.call("on_epoch_end", learner, epoch, metrics, **kwargs)

    async def on_aggregate_start(self, trainer: Trainer, updates: list[ClientUpdate],
                                 **kwargs: Any) -> None:
        await self.call("on_aggregate_start", trainer, updates, **kwargs)

    async def on_aggregate_end(self, trainer: Trainer, weights: Weights, **kwargs: Any) -> None:
        await self.call("on_aggregate_end", trainer, weights, **kwargs)

    async def on_client_failure(self, trainer: Trainer, client_id: str, error: str,
                                **kwargs: Any) -> None:
        await self.call("on_client_failure", trainer, client_id, error, **kwargs)

    async def on_client_join(self, trainer: Trainer, client_id: str, **kwargs: Any) -> None:
        await self.call("on_client_join", trainer, client_id, **kwargs)

    async def on_exception(self, trainer: Trainer, exception: BaseException,
                           **kwargs: Any) -> None:
        await self.call("on_exception", trainer, exception, **kwargs)
