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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from oiafed.exceptions import InputError

STATE_FILE = "state.safetensors"
FORMAT_VERSION = 2
TENSOR = "__tensor__"
REQUIRED = ("round_num", "weights", "aggregator", "callbacks", "should_stop", "stopped_by",
            "stop_reason", "fit_config", "history")


def capture_rng() -> dict[str, Any]:
    """The global random states user code may draw from (Python, NumPy, torch)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with each tensor moved into ``tensors`` and replaced by a reference."""
    if isinstance(value, torch.Tensor):  # serialised at once: no copy needed
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
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


def encode_state(trainer_state: dict[str, Any]) -> bytes:
    """The bytes of the state file: trainer state plus the RNG states, as of now."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split_tensors({"version": FORMAT_VERSION, "trainer": trainer_state,
                           "rng": capture_rng()}, tensors)
    return save_tensors(tensors, metadata={"oiafed_state": json.dumps(tree)})


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
    """Writes ``state.pt`` atomically in a background thread, one write in flight at most.

    The state is serialised at once (a snapshot); only the file write and fsync overlap with
    the next round. After a crash the file holds the last state whose write completed, so a
    resumed run redoes at most the round after it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def submit(self, trainer_state: dict[str, Any]) -> None:
        data = encode_state(trainer_state)
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oiafed-state")
        self._pending = self._executor.submit(self._write, data)

    def _write(self, data: bytes) -> None:
        """Temp file, fsync, rename: the file is always a whole state, old or new.

        One writer per run folder, so the temp name is fixed. The folder is not fsynced: after
        a power cut the rename may be lost, which leaves the previous (valid) state.
        """
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


def load_state(run_dir: Path) -> dict[str, Any]:
    """Read and check ``state.pt``; a clear ``InputError`` if it is missing or broken."""
    file = run_dir / STATE_FILE
    if not file.is_file():
        raise InputError(f"cannot resume: {file} does not exist (was checkpoint_every 0, or did "
                         "the run stop before its first round ended?)")
    try:
        state = decode_state(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot resume: {file} is unreadable or corrupt ({exc})") from exc
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise InputError(f"cannot resume: {file} is not an oiafed state file of version "
                         f"{FORMAT_VERSION}")
    trainer = state.get("trainer")
    missing = [key for key in REQUIRED if not isinstance(trainer, dict) or key not in trainer]
    if missing or "rng" not in state:
        raise InputError(f"cannot resume: {file} lacks {', '.join(missing) or 'rng'}")
    return state
