"""Runtimes decide where learners train; the round loop is the same in all of them.

The contract is ``runtime.base.Runtime`` (started with a ``RunSpec``, ``train`` a round's
clients before a deadline, closed with a ``RunEnd``). ``runtime.mode: <name>`` in a config
uses ``oiafed.runtime.<name>.create(cfg, worker)``.
"""

from __future__ import annotations

import importlib

from oiafed.config import ExperimentConfig
from oiafed.runtime.base import RoundLedger, RunEnd, RunSpec, Runtime
from oiafed.runtime.serial import SerialRuntime
from oiafed.runtime.worker import ClientWorker

__all__ = ["ClientWorker", "RoundLedger", "RunEnd", "RunSpec", "Runtime", "SerialRuntime",
           "create_runtime"]


def create_runtime(cfg: ExperimentConfig, worker: ClientWorker) -> Runtime:
    """The runtime ``cfg.runtime.mode`` names (``worker``: this process's client worker)."""
    if cfg.runtime.mode == "serial":
        return SerialRuntime(worker)
    module = importlib.import_module(f"oiafed.runtime.{cfg.runtime.mode}")
    runtime: Runtime = module.create(cfg, worker)
    return runtime
