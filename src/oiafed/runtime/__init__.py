"""Runtimes decide where learners train; the round loop is the same in all of them.

The contract is ``runtime.base.Runtime`` (started with a ``RunSpec``, ``train`` a round's
clients before a deadline, closed with a ``RunEnd``). ``runtime.mode: <name>`` in a config
uses ``oiafed.runtime.<name>.create(cfg)`` (serial: ``SerialRuntime(worker)``).
"""

from __future__ import annotations

import importlib

from oiafed.config import ExperimentConfig
from oiafed.runtime.base import RoundLedger, RunEnd, RunSpec, Runtime
from oiafed.runtime.serial import SerialRuntime
from oiafed.runtime.worker import ClientWorker

__all__ = ["ClientWorker", "RoundLedger", "RunEnd", "RunSpec", "Runtime", "SerialRuntime",
           "create_runtime"]


def create_runtime(cfg: ExperimentConfig, worker: ClientWorker | None = None) -> Runtime:
    """The runtime ``cfg.runtime.mode`` names; the serial one trains with ``worker`` (this
    process's), the others build their own workers elsewhere from ``cfg``."""
    if cfg.runtime.mode == "serial":
        if worker is None:
            raise ValueError("the serial runtime needs this process's ClientWorker")
        return SerialRuntime(worker)
    module = importlib.import_module(f"oiafed.runtime.{cfg.runtime.mode}")
    runtime: Runtime = module.create(cfg)
    return runtime
