"""A run's resumable state, written atomically after rounds, never pickled.

The file is safetensors: every tensor of the state (global weights, RNG states, any tensor a
component keeps) is stored as a tensor, and everything else as JSON in the file's metadata,
where each tensor is referenced as ``{"__tensor__": name}``.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from oiafed.exceptions import InputError
from oiafed.runtime.codec import tensor_bytes

STATE_FILE = "state.safetensors"
FORMAT_VERSION = 2
TENSOR = "__tensor__"
REQUIRED = ("round_num", "weights", "aggregator", "callbacks", "should_stop", "stopped_by",
            "stop_reason", "fit_config", "history")


def capture_rng() -> dict[str, Any]:
    """The global random states user code may draw from (Python, NumPy, torch), as of now.

    Cheap (it runs in the round loop, at each save): the conversion to storable form waits
    for ``encode_snapshot``. Every part is a fresh object, safe to encode later.
    """
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def _storable_rng(raw: dict[str, Any]) -> dict[str, Any]:
    """``capture_rng()``'s states as tensors and JSON values (what ``restore_rng`` reads)."""
    version, internal, gauss = raw["python"]
    name, keys, pos, has_gauss, cached = raw["numpy"]
    return {
        "python": [version, torch.from_numpy(np.array(internal, dtype=np.int64)), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": raw["torch"],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with each tensor copied into ``tensors`` and replaced by a reference."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: name}
    if isinstance(value, dict):
        return {str(k): _split_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split_tensors(v, tensors) for v in value]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


@dataclass(frozen=True)
class Snapshot:
    """A run state taken after a round, detached from the live objects, not yet encoded."""

    trainer_json: str
    tensors: dict[str, torch.Tensor]
    rng: dict[str, Any]


def take_snapshot(trainer_state: dict[str, Any]) -> Snapshot:
    """Copy ``trainer_state`` (its tensors, as JSON the rest) and the RNG states, now.

    Raises:
        TypeError: when the state holds a value that is neither a tensor nor JSON-able.
    """
    tensors: dict[str, torch.Tensor] = {}
    trainer_json = json.dumps(_split_tensors(trainer_state, tensors))
    return Snapshot(trainer_json, tensors, capture_rng())


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The bytes of the state file for ``snapshot``."""
    tensors = dict(snapshot.tensors)
    rng_json = json.dumps(_split_tensors(_storable_rng(snapshot.rng), tensors))
    tree = f'{{"version": {FORMAT_VERSION}, "trainer": {snapshot.trainer_json}, "rng": {rng_json}}}'
    return tensor_bytes(tensors, metadata={"oiafed_state": tree})


def decode_state(data: bytes) -> dict[str, Any]:
    """The state dict from the bytes of a state file.

    Raises:
        ValueError: when ``data`` is not an oiafed state file.
    """
    try:
        tensors = load_tensors(data)  # validates the whole file first
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size])["__metadata__"]
        tree = json.loads(metadata["oiafed_state"])
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    return _join_tensors(tree, tensors)


class StateWriter:
    """Writes the state file atomically in a background thread, one write in flight at most.

    ``submit`` only takes a snapshot (copies of the tensors, the rest as JSON, the RNG states);
    encoding, the file write and fsync overlap with the next round. After a crash the file
    holds the last state whose write completed; a resumed run redoes the rounds after it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def submit(self, trainer_state: dict[str, Any]) -> None:
        self.submit_snapshot(take_snapshot(trainer_state))

    def submit_snapshot(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` (after the write in flight, if any)."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oiafed-state")
        self._pending = self._executor.submit(self._write, snapshot)

    def _write(self, snapshot: Snapshot) -> None:
        """Temp file, fsync, rename: the file is always a whole state, old or new.

        One writer per run folder, so the temp name is fixed. The folder is not fsynced: after
        a power cut the rename may be lost, which leaves the previous (valid) state.
        """
        data = encode_snapshot(snapshot)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def wait(self) -> None:
        """Block until the write in flight is on disk (re-raising its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def load_state(run_dir: Path, why: str = "cannot resume") -> dict[str, Any]:
    """Read and check the state file; a clear ``InputError`` (starting with ``why``) if it is
    missing or broken."""
    file = run_dir / STATE_FILE
    if not file.is_file():
        raise InputError(f"{why}: {file} does not exist (checkpoint_every 0, or the run "
                         "stopped before its first save)")
    try:
        state = decode_state(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{why}: {file} is unreadable or corrupt ({exc})") from exc
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise InputError(f"{why}: {file} is not an oiafed state file of version "
                         f"{FORMAT_VERSION}")
    trainer = state.get("trainer")
    missing = [key for key in REQUIRED if not isinstance(trainer, dict) or key not in trainer]
    if missing or "rng" not in state:
        raise InputError(f"{why}: {file} lacks {', '.join(missing) or 'rng'}")
    return state
