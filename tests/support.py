"""Small configs and helpers shared by the tests."""

from __future__ import annotations

import copy
from typing import Any

from oiafed import Callback, registry


def tiny_config(**sections: Any) -> dict[str, Any]:
    """A fast experiment: digits, 4 IID clients, logistic regression, 3 rounds."""
    config: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"type": "digits", "num_clients": 4},
        "model": {"type": "logreg"},
        "trainer": {"args": {"rounds": 3}},
        "learner": {"args": {"lr": 0.05, "batch_size": 32}},
    }
    for key, value in sections.items():
        config[key] = copy.deepcopy(value)
    return config


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows without wall-clock fields (which differ between identical runs)."""
    return [{k: v for k, v in row.items() if k != "round_time"} for row in history]


class RegistrySnapshot:
    """Restores the registry on exit, so a test may register or override names freely."""

    def __enter__(self) -> RegistrySnapshot:
        registry.load_builtins()
        self._by_name = dict(registry._by_name)
        self._name_by_obj = dict(registry._name_by_obj)
        return self

    def __exit__(self, *exc: object) -> None:
        registry._by_name.clear()
        registry._by_name.update(self._by_name)
        registry._name_by_obj.clear()
        registry._name_by_obj.update(self._name_by_obj)


class Recorder(Callback):
    """Records every hook with the arguments that identify the call."""

    def __init__(self) -> None:
        self.trace: list[tuple] = []

    async def on_train_start(self, trainer, **kwargs):
        self.trace.append(("on_train_start",))

    async def on_train_end(self, trainer, result, **kwargs):
        self.trace.append(("on_train_end", result.rounds_completed))

    async def on_round_start(self, trainer, round_num, **kwargs):
        self.trace.append(("on_round_start", round_num))

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        self.trace.append(("on_round_end", round_num, result.round_num))

    async def on_epoch_start(self, learner, epoch, **kwargs):
        self.trace.append(("on_epoch_start", learner.client_id, epoch))

    async def on_epoch_end(self, learner, epoch, metrics, **kwargs):
        self.trace.append(("on_epoch_end", learner.client_id, epoch, sorted(metrics)))

    async def on_aggregate_start(self, trainer, updates, **kwargs):
        self.trace.append(("on_aggregate_start", [u.client_id for u in updates]))

    async def on_aggregate_end(self, trainer, weights, **kwargs):
        self.trace.append(("on_aggregate_end", sorted(weights)))

    async def on_client_failure(self, trainer, client_id, error, **kwargs):
        self.trace.append(("on_client_failure", client_id, error))


class Interrupt(Callback):
    """A crash (Ctrl-C) at the end of ``round_num``, after the callbacks before it ran."""

    def __init__(self, round_num: int) -> None:
        self.round_num = round_num

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        if round_num == self.round_num:
            raise KeyboardInterrupt
