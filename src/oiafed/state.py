"""A run's resumable state: written atomically after rounds, read back with ``weights_only``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oiafed.exceptions import InputError
from oiafed.io import atomic_torch_save

STATE_FILE = "state.pt"
FORMAT_VERSION = 1
REQUIRED = ("round_num", "weights", "aggregator", "callbacks", "should_stop", "stopped_by",
            "stop_reason", "fit_config", "history")


def capture_rng() -> dict[str, Any]:
    """The global random states user code may draw from (Python, NumPy, torch)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_state(run_dir: Path, trainer_state: dict[str, Any]) -> None:
    """Write ``state.pt`` (trainer state + RNG states) atomically."""
    atomic_torch_save({"version": FORMAT_VERSION, "trainer": trainer_state, "rng": capture_rng()},
                      run_dir / STATE_FILE)


def load_state(run_dir: Path) -> dict[str, Any]:
    """Read and check ``state.pt``; a clear ``InputError`` if it is missing or broken."""
    file = run_dir / STATE_FILE
    if not file.is_file():
        raise InputError(f"cannot resume: {file} does not exist (was checkpoint_every 0, or did "
                         "the run stop before its first round ended?)")
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise InputError(f"cannot resume: {file} is unreadable or corrupt ({exc})") from exc
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise InputError(f"cannot resume: {file} is not an oiafed state file of version "
                         f"{FORMAT_VERSION}")
    trainer = state.get("trainer")
    missing = [key for key in REQUIRED if not isinstance(trainer, dict) or key not in trainer]
    if missing or "rng" not in state:
        raise InputError(f"cannot resume: {file} lacks {', '.join(missing) or 'rng'}")
    return state
