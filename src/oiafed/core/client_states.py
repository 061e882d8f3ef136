"""The per-client state an algorithm's server half keeps (SCAFFOLD's control variates, FedDyn's
gradient corrections, ...), part of the resumable run state.

The server half owns it and sends each sampled client its part in the round's per-client
extras, so the state is the same whichever runtime trains the clients, and a resumed run finds
exactly the states of the round it resumes after.

Every ``put`` writes ``<folder>/<client_id>@<round>.safetensors`` (``client_state.encode_state``:
tensors, the rest as JSON; nothing pickled). A client's older versions are deleted once a
newer one belongs to a round whose run state is safely on disk (``collect``), so a crash at any
moment leaves the version each client had at the last saved round; ``restore`` (on resume)
drops the versions written after it. The most recently used states stay in memory too, up to
``memory_bytes`` in all.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from oiafed.client_state import State, check_id, encode_state, read_state, write_bytes

MEMORY_BYTES = 256 * 2**20
_FILE = re.compile(r"^(?P<client>.+)@(?P<round>\d+)\.safetensors$")


def _nbytes(state: State) -> int:
    return sum(v.nelement() * v.element_size() for v in state.values()
               if isinstance(v, torch.Tensor))


class ClientStates:
    """Client id -> the state dict its server half stored last (tensors and JSON values).

    The trainer sets ``round`` before each round; ``put`` stores a state as of that round.
    ``get`` returns the stored dict itself: treat it as read-only and ``put`` a new one.

    Args:
        folder: where versions are written (created on the first ``put``); None: a private
            temporary folder, removed when the object is closed or collected.
        memory_bytes: the most bytes of tensors kept in memory (least recently used go).
    """

    def __init__(self, folder: Path | None = None, memory_bytes: int = MEMORY_BYTES) -> None:
        self.folder = folder
        self.memory_bytes = memory_bytes
        self.round = 0
        self._versions: dict[str, list[int]] | None = None if folder is not None else {}
        self._memory: OrderedDict[str, tuple[int, State]] = OrderedDict()
        self._memory_used = 0
        self._uncollected: set[str] = set()
        self._cleanup: weakref.finalize | None = None

    def get(self, client_id: str) -> State | None:
        """``client_id``'s latest state, or None when none was stored."""
        cached = self._memory.get(client_id)
        if cached is not None:
            self._memory.move_to_end(client_id)
            return cached[1]
        versions = self._index().get(client_id)
        if not versions:
            return None
        state = read_state(self._file(client_id, versions[-1]))
        self._remember(client_id, versions[-1], state)
        return state

    def put(self, client_id: str, state: State) -> None:
        """Store ``state`` as ``client_id``'s as of the current round.

        Raises:
            ClientStateError: for an id unfit for a file name, or a value neither a tensor nor
                JSON-able.
        """
        check_id(client_id)
        payload = encode_state(client_id, state)  # checked before the folder is made
        write_bytes(self._folder() / f"{client_id}@{self.round}.safetensors", payload)
        versions = self._index().setdefault(client_id, [])
        if not versions or versions[-1] != self.round:
            versions.append(self.round)
        self._uncollected.add(client_id)
        self._remember(client_id, self.round, state)

    def __contains__(self, client_id: object) -> bool:
        return isinstance(client_id, str) and (
            client_id in self._memory or bool(self._index().get(client_id)))

    def collect(self, durable_round: int) -> None:
        """Delete the versions no resume can need: those older than a client's newest version
        of a round <= ``durable_round`` (the last round whose run state is on disk).

        Costs O(clients written since the last call)."""
        done = set()
        for client_id in self._uncollected:
            versions = self._index()[client_id]
            kept = [r for r in versions if r <= durable_round]
            for stale in kept[:-1]:
                self._file(client_id, stale).unlink(missing_ok=True)
            versions[:] = kept[-1:] + [r for r in versions if r > durable_round]
            if all(r <= durable_round for r in versions):
                done.add(client_id)
        self._uncollected -= done

    def restore(self, round_num: int) -> None:
        """Continue after round ``round_num`` (a resume): forget and delete every version
        written after it, and those it superseded."""
        self._versions = None
        self._memory.clear()
        self._memory_used = 0
        for client_id, versions in self._index().items():
            later = [r for r in versions if r > round_num]
            for stale in later:
                self._file(client_id, stale).unlink(missing_ok=True)
            versions[:] = [r for r in versions if r <= round_num]
            self._uncollected.add(client_id)
        self.collect(round_num)
        self.round = round_num

    def close(self) -> None:
        """Drop what is in memory (the files stay, unless the folder is temporary)."""
        self._memory.clear()
        self._memory_used = 0
        if self._cleanup is not None:
            self._cleanup()

    # -- internals -----------------------------------------------------------------------------

    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="oiafed-client-states-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def _file(self, client_id: str, round_num: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{client_id}@{round_num}.safetensors"

    def _index(self) -> dict[str, list[int]]:
        """Client id -> the rounds of its versions on disk, oldest first (a folder written by
        an earlier session is listed once)."""
        if self._versions is None:
            found: dict[str, list[int]] = {}
            if self.folder is not None and self.folder.is_dir():
                for file in self.folder.iterdir():
                    match = _FILE.match(file.name)
                    if match:
                        found.setdefault(match["client"], []).append(int(match["round"]))
            for versions in found.values():
                versions.sort()
            self._versions = found
        return self._versions

    def _remember(self, client_id: str, round_num: int, state: State) -> None:
        old = self._memory.pop(client_id, None)
        if old is not None:
            self._memory_used -= _nbytes(old[1])
        size = _nbytes(state)
        if size > self.memory_bytes:
            return
        self._memory[client_id] = (round_num, state)
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, (_, evicted) = self._memory.popitem(last=False)
            self._memory_used -= _nbytes(evicted)
