"""Small configs and helpers shared by the tests."""

from __future__ import annotations

import copy
from typing import Any

from oiafed import registry


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
