"""Runtimes decide where learners train; the round loop is the same in all of them.

A runtime is an object with ``async start()``, ``async train(round_num, client_ids, weights,
config) -> list[ClientUpdate]`` (updates in the order of ``client_ids``) and ``async close()``.
``runtime.mode: <name>`` in a config uses ``oiafed.runtime.<name>.create(cfg, worker)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from oiafed.config import ExperimentConfig
from oiafed.runtime.serial import SerialRuntime
from oiafed.runtime.worker import ClientWorker

__all__ = ["ClientWorker", "SerialRuntime", "create_runtime"]


def create_runtime(cfg: ExperimentConfig, worker: ClientWorker) -> Any:
    """The runtime ``cfg.runtime.mode`` names (``worker``: this process's client worker)."""
    if cfg.runtime.mode == "serial":
        return SerialRuntime(worker)
    module = importlib.import_module(f"oiafed.runtime.{cfg.runtime.mode}")
    return module.create(cfg, worker)
