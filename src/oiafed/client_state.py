"""Per-client persistent state in bounded memory: the rest spills to disk.

Algorithms such as SCAFFOLD (control variates), FedDyn or per-client personalisation keep state
for every client between the rounds it is sampled in. With 100,000 clients that state cannot all
live in memory, so ``ClientStateStore`` keeps the ``max_in_memory`` most recently used entries
and writes the others to ``spill_dir/<client_id>.safetensors``.

One file per client holds its tensors (safetensors) and, in the same file's header metadata,
its other values as JSON: one atomic rename per entry, so a crash never leaves tensors and
values of different versions side by side (a separate JSON sidecar could). Nothing is pickled.

Example:
    >>> store = ClientStateStore(max_in_memory=2)  # spills to a temporary folder
    >>> store.put("client_7", {"control": torch.zeros(3), "visits": 1})
    >>> store.get("client_7")["visits"]
    1
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from oiafed.exceptions import ClientStateError
from oiafed.io import atomic_open

SUFFIX = ".safetensors"
VALUES_KEY = "oiafed.values"
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
"""What a client id may be (``fullmatch``): letters, digits, ``_``, ``.`` and ``-`` (not
first), at most 200 characters. Ids name state files and appear in logs: the gRPC server
refuses a Hello with any other id, and a message naming one is malformed (``envelope``)."""

State = dict[str, Any]


class ClientStateStore:
    """Client id -> state dict (tensors and JSON-able values), least recently used spilled.

    ``get`` returns the stored dict itself (loaded back from disk if it was spilled); a caller
    that changes it in place should ``put`` it back, which marks it most recently used. A value
    that is not a tensor must be JSON-able; it comes back as JSON gives it (tuples as lists).

    Args:
        max_in_memory: most entries kept in memory. 0 keeps none: every ``put`` writes to disk
            and every ``get`` reads it (for several processes sharing one ``spill_dir``).
        spill_dir: folder of spilled entries; entries already there are found (a new store on
            the same folder continues an old one). None: a private temporary folder, removed
            by ``close()`` or when the store is garbage-collected.

    Raises:
        ClientStateError: from ``put`` for an id unfit for a file name or a value neither a
            tensor nor JSON-able; from ``get`` for a spilled file that cannot be read.
    """

    def __init__(self, max_in_memory: int = 1000, spill_dir: str | Path | None = None) -> None:
        if max_in_memory < 0:
            raise ValueError(f"max_in_memory must be >= 0, got {max_in_memory}")
        self.max_in_memory = max_in_memory
        self._dir = Path(spill_dir) if spill_dir is not None else None
        self._temporary = spill_dir is None
        self._memory: OrderedDict[str, State] = OrderedDict()
        self._lock = threading.RLock()
        self._cleanup: weakref.finalize | None = None
        self.spills = 0
        """How many entries were written to disk (evictions and write-throughs)."""

    # -- the mapping ---------------------------------------------------------------------------

    def get(self, client_id: str, default: State | None = None) -> State | None:
        """Client ``client_id``'s state, or ``default`` when it has none."""
        with self._lock:
            state = self._memory.get(client_id)
            if state is not None:
                self._memory.move_to_end(client_id)
                return state
            file = self._file(client_id, create=False)
            if file is None or not file.is_file():
                return default
            state = self._read(file)
            if self.max_in_memory:
                self._memory[client_id] = state
                self._evict()
            return state

    def put(self, client_id: str, state: State) -> None:
        """Store ``state`` as client ``client_id``'s (the most recently used entry)."""
        check_state(client_id, state)  # fail now, not at spill time
        with self._lock:
            if not self.max_in_memory:
                self._write(client_id, state)
                return
            self._memory[client_id] = state
            self._memory.move_to_end(client_id)
            self._evict()

    def delete(self, client_id: str) -> None:
        """Forget client ``client_id``'s state (in memory and on disk)."""
        with self._lock:
            self._memory.pop(client_id, None)
            file = self._file(client_id, create=False)
            if file is not None:
                file.unlink(missing_ok=True)

    def __contains__(self, client_id: object) -> bool:
        if not isinstance(client_id, str):
            return False
        with self._lock:
            if client_id in self._memory:
                return True
            file = self._file(client_id, create=False) if CLIENT_ID_PATTERN.fullmatch(client_id) else None
            return file is not None and file.is_file()

    @property
    def num_in_memory(self) -> int:
        """How many entries are in memory now (at most ``max_in_memory``)."""
        return len(self._memory)

    @property
    def spill_dir(self) -> Path | None:
        """The folder spilled entries go to (None until a temporary one is needed)."""
        return self._dir

    def flush(self) -> None:
        """Write every in-memory entry to disk too (they stay in memory)."""
        with self._lock:
            for client_id, state in self._memory.items():
                self._write(client_id, state)

    def close(self) -> None:
        """Flush to a given ``spill_dir``; remove a temporary one. The store is empty after."""
        with self._lock:
            if self._temporary:
                if self._cleanup is not None:
                    self._cleanup()
                self._dir = None
            else:
                self.flush()
            self._memory.clear()

    # -- disk ----------------------------------------------------------------------------------

    def _evict(self) -> None:
        while len(self._memory) > self.max_in_memory:
            client_id, state = self._memory.popitem(last=False)
            self._write(client_id, state)

    @overload
    def _file(self, client_id: str, create: Literal[True]) -> Path: ...

    @overload
    def _file(self, client_id: str, create: Literal[False]) -> Path | None: ...

    def _file(self, client_id: str, create: bool) -> Path | None:
        """The spill file of ``client_id``; with ``create``, making the spill folder if need be."""
        check_id(client_id)
        if self._dir is None:
            if not create:
                return None
            self._dir = Path(tempfile.mkdtemp(prefix="oiafed-client-state-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        return self._dir / f"{client_id}{SUFFIX}"

    def _write(self, client_id: str, state: State) -> None:
        file = self._file(client_id, create=True)
        file.parent.mkdir(parents=True, exist_ok=True)
        write_state(file, client_id, state)
        self.spills += 1

    @staticmethod
    def _read(file: Path) -> State:
        return read_state(file)


def encode_state(client_id: str, state: State) -> bytes:
    """One client's ``state`` as the bytes of its file (tensors, the rest as JSON).

    Raises:
        ClientStateError: for a state that is not a dict of tensors and JSON-able values.
    """
    _check_dict(client_id, state)
    tensors, values = _split(client_id, state)
    return save_tensors(tensors, metadata={VALUES_KEY: values})


def write_state(file: Path, client_id: str, state: State) -> None:
    """Write one client's ``state`` to ``file`` atomically (``encode_state``)."""
    write_bytes(file, encode_state(client_id, state))


def write_bytes(file: Path, payload: bytes) -> None:
    """Write ``payload`` to ``file`` atomically."""
    with atomic_open(file, "wb") as handle:
        handle.write(payload)


def read_state(file: Path) -> State:
    """What ``write_state`` wrote to ``file``.

    Raises:
        ClientStateError: when the file cannot be read or is not a client state.
    """
    try:
        data = file.read_bytes()
        tensors = load_tensors(data)
        values = json.loads(_metadata(data).get(VALUES_KEY, "{}"))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise ClientStateError(f"cannot read client state {file}: {exc}") from exc
    if not isinstance(values, dict) or set(values) & set(tensors):
        raise ClientStateError(f"cannot read client state {file}: malformed values")
    return {**values, **tensors}


def check_state(client_id: str, state: Any) -> None:
    """Refuse an id unfit for a file name and a state that is not a dict of tensors and
    JSON-able values (``ClientStateError``)."""
    check_id(client_id)
    _check_dict(client_id, state)
    _split(client_id, state)


def _check_dict(client_id: str, state: Any) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ClientStateError(f"the state of {client_id} must be a dict with str keys")


def check_id(client_id: Any) -> None:
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ClientStateError(
            f"client id {client_id!r} cannot name a state file: use letters, digits, '_', '.', '-' "
            "(not first), at most 200 characters")


def _split(client_id: str, state: State) -> tuple[dict[str, torch.Tensor], str]:
    """The state's tensors (CPU, contiguous) and its other values as JSON text."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    try:
        text = json.dumps(values, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ClientStateError(
            f"the state of {client_id} holds a value that is neither a tensor nor JSON-able: {exc}"
        ) from exc
    return tensors, text


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (its JSON header's own entry)."""
    if len(data) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("malformed header")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("malformed header")
    return metadata
