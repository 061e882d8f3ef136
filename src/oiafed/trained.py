"""Use a trained model: ``load_model`` rebuilds a run's model and loads its saved weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oiafed import registry
from oiafed.callbacks.model_checkpoint import BEST as BEST_FILE
from oiafed.config import ExperimentConfig, load_config
from oiafed.device import resolve_device
from oiafed.exceptions import InputError
from oiafed.run_folder import CONFIG, PARTITION
from oiafed.runtime.worker import build_model
from oiafed.state import STATE_FILE, load_state

WHICH = ("best", "last", "final")


def load_model(run_dir: str | Path, which: str = "final",
               device: str | torch.device = "cpu") -> nn.Module:
    """The model of the run in ``run_dir``, built as the run built it, with saved weights, in
    eval mode, on ``device`` (``cpu`` by default, whatever the run trained on; ``auto``,
    ``cuda``, ``cuda:N``, ``mps`` as in a config).

    Args:
        run_dir: a run folder.
        which: ``"final"``: the weights after the last round of a finished run (its state
            file); ``"last"``: the weights of the last round saved in the state file
            (``state.safetensors``), finished or not; ``"best"``: the best round's weights
            that the ``model_checkpoint`` callback saved (``best.pt`` in its ``save_dir``).

    Raises:
        InputError: when ``run_dir`` is not a run folder, ``which`` is unknown, or the weights
            asked for were not saved (naming the file missing and why), or do not fit.
        ConfigError: for a ``device`` not available here.

    Example:
        >>> model = oiafed.load_model("runs/try")
        >>> predictions = model(x).argmax(dim=1)
    """
    folder = Path(run_dir)
    target = resolve_device(device, "device")
    if not (folder / CONFIG).is_file():
        raise InputError(f"{folder} is not a run folder (no {CONFIG})")
    if which not in WHICH:
        raise InputError(f"which must be one of {', '.join(WHICH)}; got {which!r}")
    cfg = load_config(folder / CONFIG)
    if which == "best":
        weights = _best_weights(folder, cfg)
    else:
        weights = _state_weights(folder, cfg, final=which == "final")
    model = _build(folder, cfg)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"the {which} weights of {folder} do not fit the model its "
                         f"{CONFIG} describes ({exc})") from exc
    return model.to(target).eval()


@dataclass(frozen=True)
class _Shape:
    input_shape: tuple[int, ...]
    num_classes: int


def _build(folder: Path, cfg: ExperimentConfig) -> nn.Module:
    """The configured model, shaped from ``partition.json``'s ``model_input`` (or, for a
    folder written before it was recorded there, from the data the config describes)."""
    info = _model_input(folder)
    if info is None:
        from oiafed.data.federated import build_federated_data

        return build_model(cfg, build_federated_data(cfg.data, cfg.seed))
    return build_model(cfg, _Shape(tuple(info["input_shape"]), int(info["num_classes"])))


def _model_input(folder: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((folder / PARTITION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    info = report.get("model_input") if isinstance(report, dict) else None
    return info if isinstance(info, dict) and {"input_shape", "num_classes"} <= set(info) else None


def _state_weights(folder: Path, cfg: ExperimentConfig, *, final: bool) -> dict[str, Any]:
    trainer = load_state(folder, "no saved weights")["trainer"]
    if not isinstance(trainer.get("weights"), dict):
        raise InputError(f"{folder / STATE_FILE} holds no model weights")
    if final:
        rounds = getattr(registry.build("trainer", cfg.trainer.model_dump(), "trainer"),
                         "rounds", None)
        saved = trainer.get("round_num", 0)
        if not trainer.get("should_stop") and (rounds is None or saved < rounds):
            raise InputError(f"the run in {folder} has not finished: its state holds round "
                             f"{saved} of {rounds}. which='final' needs a finished run; "
                             f"which='last' gives round {saved}'s weights (or resume the run)")
    return dict(trainer["weights"])


def _best_weights(folder: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    candidates = []
    for i, section in enumerate(cfg.callbacks):
        if section.type == "model_checkpoint":
            saver = registry.build("callback", section.model_dump(), f"callbacks[{i}]")
            if getattr(saver, "save_best", True):
                save_dir = Path(getattr(saver, "save_dir", "checkpoints")).expanduser()
                candidates.append(save_dir / BEST_FILE if save_dir.is_absolute()
                                  else folder / save_dir / BEST_FILE)
    if not any(section.type == "model_checkpoint" for section in cfg.callbacks):
        candidates.append(folder / "checkpoints" / BEST_FILE)  # a callback given to run()
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        missing = candidates[0] if candidates else "a best checkpoint"
        raise InputError(f"no best weights for {folder}: {missing} does not exist. "
                         "which='best' needs the model_checkpoint callback with save_best: "
                         "true in the run; which='final' or 'last' read the run's state")
    try:
        payload = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only: a file that is more than tensors is refused
        raise InputError(f"{found} is unreadable or not a checkpoint of weights ({exc})") from exc
    weights = payload.get("weights") if isinstance(payload, dict) else None
    if not isinstance(weights, dict):
        raise InputError(f"{found} holds no 'weights'")
    return weights
