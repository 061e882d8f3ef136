"""Runtimes decide where learners train; the round loop is the same in all of them."""

from oiafed.runtime.serial import SerialRuntime

__all__ = ["SerialRuntime"]
