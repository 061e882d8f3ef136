"""The sweep folder's lock: one sweep at a time runs into a folder, and a sweep started again
waits for no cell of the one before it (its cells hold the lock too, until they end)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from oiafed.exceptions import InputError

LOCK_FILE = ".lock"
"""In the sweep folder; taken (``flock``, exclusive) for the whole sweep."""


@contextlib.contextmanager
def sweep_lock(folder: Path) -> Iterator[int]:
    """Take the lock of the sweep folder ``folder`` (which exists) without waiting, and hold
    it until the block ends; yield its file descriptor, which the cells' processes inherit
    (the lock is released once the last process holding it has closed it).

    Raises:
        InputError: naming the folder, when another sweep (or a cell of one) holds it.
    """
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another sweep is running in {folder} (or cells of one are still stopping): "
                f"it holds {folder / LOCK_FILE}; wait for it to end or choose another "
                "--sweep-dir") from None
        yield fd
    finally:
        os.close(fd)
