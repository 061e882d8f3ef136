"""``runtime.mode: parallel``: worker processes on this machine (``driver.py`` in the run's
process, ``worker.py`` in each worker process)."""

from oiafed.runtime.parallel.driver import ParallelRuntime, create, describe_exit

__all__ = ["ParallelRuntime", "create", "describe_exit"]
