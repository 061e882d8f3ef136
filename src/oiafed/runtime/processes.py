"""How runtimes start the processes that train clients on this machine (parallel workers,
loopback gRPC clients): forked from one forkserver that has imported torch, oiafed and what a
first round needs (``torch._dynamo``, which ``torch.optim`` imports on first use: ~0.8 s of
CPU; scikit-learn's splitting, ~0.5 s), so each process starts in milliseconds instead of
paying the imports again. Where the OS has no forkserver, processes are spawned.

The forkserver starts once per Python process, with the environment of that moment; what a
run needs of its own (``sys.path``, for user modules named in ``imports``, and the working
directory, for relative paths) is handed to each child with ``ProcessSetup``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from multiprocessing.context import BaseContext

PRELOAD = ["oiafed.callbacks", "oiafed.runtime.parallel.worker", "oiafed.runtime.grpc.client",
           "rich.logging", "torch._dynamo", "sklearn.model_selection"]
"""Modules the forkserver imports once for every process forked from it. Not ``oiafed.cli``:
under ``python -m oiafed.cli`` the forkserver runs it as its main module, and runpy warns
when it was imported before."""


def context() -> BaseContext:
    """The forkserver context (with ``PRELOAD``) where the OS has one, else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@dataclass(frozen=True)
class ProcessSetup:
    """What a child process takes over from the run's process: its import path and folder."""

    sys_path: tuple[str, ...]
    cwd: str

    @classmethod
    def here(cls) -> ProcessSetup:
        return cls(tuple(p for p in sys.path if p), os.getcwd())

    def pythonpath(self) -> str:
        """``$PYTHONPATH`` for a child started another way (a new interpreter, a Ray worker):
        the import path's folders, made absolute, then the current ``$PYTHONPATH``."""
        folders = [os.path.abspath(p) for p in self.sys_path if os.path.isdir(p)]
        return os.pathsep.join([*folders, *filter(None, [os.environ.get("PYTHONPATH")])])

    def apply(self) -> None:
        """Make this (child) process import and resolve paths as the run's process does."""
        sys.path[:0] = [p for p in self.sys_path if p not in sys.path]
        if os.path.isdir(self.cwd):
            os.chdir(self.cwd)
