"""config -> components -> runtime -> ``TrainResult`` and a run folder."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from oiafed import registry
from oiafed.callbacks.base import CallbackManager, overrides
from oiafed.config import ExperimentConfig, load_config
from oiafed.core.trainer import Trainer
from oiafed.core.types import TrainResult
from oiafed.data.federated import FederatedSource, build_federated_data
from oiafed.exceptions import InputError
from oiafed.run_folder import CONFIG as CONFIG_FILE
from oiafed.run_folder import RunFolder
from oiafed.runtime import create_runtime
from oiafed.runtime.worker import ClientWorker, build_callbacks, build_model
from oiafed.seeding import seed_global_generators
from oiafed.state import load_state, restore_rng

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Experiment:
    """Everything a run is made of, built from a validated config."""

    config: ExperimentConfig
    data: FederatedSource
    trainer: Trainer
    callbacks: CallbackManager

    @classmethod
    def build(cls, cfg: ExperimentConfig, extra_callbacks: list[Any] | None = None) -> Experiment:
        data = build_federated_data(cfg.data, cfg.seed)
        model = build_model(cfg, data)
        manager = CallbackManager([*build_callbacks(cfg), *(extra_callbacks or [])],
                                  strict=cfg.strict)
        if cfg.runtime.mode != "serial":
            _warn_driver_only_hooks(cfg.runtime.mode, extra_callbacks or [])
        worker = ClientWorker.from_config(cfg, callbacks=manager, data=data, model=model)
        trainer = registry.build("trainer", cfg.trainer.model_dump(), "trainer")
        trainer.fit_config["lr"] = worker.learner.lr
        trainer.bind(
            model=model,
            aggregator=registry.build("aggregator", cfg.aggregator.model_dump(), "aggregator"),
            runtime=create_runtime(cfg, worker),
            callbacks=manager,
            test_data=data.test,
            client_ids=data.client_ids,
            seed=cfg.seed,
            config=cfg,
            index_of=data.index_of,
        )
        return cls(cfg, data, trainer, manager)


def _warn_driver_only_hooks(mode: str, callbacks: list[Any]) -> None:
    """Warn when callbacks given as instances (not in the config) have epoch hooks: learners
    that run elsewhere rebuild only the configured callbacks."""
    names = [type(cb).__name__ for cb in callbacks
             if any(overrides(cb, hook) for hook in ("on_epoch_start", "on_epoch_end"))]
    if names:
        logger.warning(
            "runtime.mode %s: the epoch hooks of %s (callback instances, not in the config) "
            "run only in serial mode; learners in other processes rebuild the callbacks of the "
            "config. Register the callback and list it under callbacks: to run its epoch hooks "
            "where the learners run.", mode, ", ".join(names))


def validate(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Check a config as far as can be done without data: the schema, every component's
    arguments, and the values their constructors check (nothing is written or trained)."""
    cfg = load_config(config, overrides)
    for kind, path, section in cfg.sections():
        if kind not in ("dataset", "model"):
            registry.build(kind, {"type": section.type, "args": section.args}, path)
    return cfg


def run(
    config: str | Path | dict[str, Any] | ExperimentConfig | None,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: list[Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainResult:
    """Run a federated experiment from a YAML path or a config dict.

    Args:
        config: path of a YAML file, a dict, or an ``ExperimentConfig``; None when resuming
            (the run folder's ``config.yaml`` is used).
        run_dir: the run folder (default ``<output_dir>/<name>-<timestamp>``).
        resume: a run folder to continue after its last saved round; the result equals that
            of an uninterrupted run. A config given too must match the saved one.
        callbacks: callback instances to add after the configured ones.
        overrides: ``["trainer.args.rounds=5", ...]`` or ``{"trainer.args.rounds": 5}``.

    Returns:
        The ``TrainResult`` (history, stop reason, final weights, run folder).

    Raises:
        ConfigError: when the config is invalid (nothing is written).
        InputError: when ``resume`` names no resumable run (nothing is changed).
    """
    if resume is not None:
        folder, experiment = _resume(config, Path(resume), callbacks, overrides)
    else:
        if config is None:
            raise InputError("give a config (or a run folder to resume)")
        cfg = load_config(config, overrides)
        seed_global_generators(cfg.seed)  # a resumed run restores them from its state instead
        experiment = Experiment.build(cfg, callbacks)
        folder = RunFolder.create(run_dir, cfg)
        folder.write_config(cfg)
        folder.write_partition(experiment.data.report())
    trainer = experiment.trainer
    trainer.recorder = folder
    trainer.run_dir = folder.path
    logger.info("run folder: %s", folder.path)
    try:
        result = run_coroutine(trainer.fit())
    except BaseException as exc:
        _end_failed(folder, trainer, exc)
        raise
    result.run_dir = folder.path
    try:
        if not folder.saved_round(trainer.round_num):
            folder.save_state(trainer)
    finally:
        folder.close()
    folder.write_summary(result)
    return result


def _end_failed(folder: RunFolder, trainer: Trainer, exc: BaseException) -> None:
    """After a run ended by ``exc``: the state of the last completed round on disk, a summary
    saying why it stopped, and how to resume it in the log."""
    interrupted = isinstance(exc, KeyboardInterrupt | asyncio.CancelledError)
    reason = "interrupted" if interrupted else f"failed: {type(exc).__name__}: {exc}"
    result = trainer.result(stop_reason=reason)
    result.run_dir = folder.path
    try:
        folder.save_pending()
    finally:
        folder.close()
    folder.write_summary(result)
    if folder.has_state():
        logger.warning("the run %s after round %d; its state is saved in %s: continue it "
                       "with --resume %s", "was interrupted" if interrupted else "failed",
                       result.rounds_completed, folder.path, folder.path)


def _resume(
    config: Any, run_dir: Path, callbacks: list[Any] | None, overrides: Any
) -> tuple[RunFolder, Experiment]:
    """Rebuild a run from its folder and saved state; change nothing on disk until all is read."""
    folder = RunFolder.open(run_dir)
    saved = load_config(folder.path / CONFIG_FILE, overrides)
    if config is not None:
        given = load_config(config, overrides)
        if given != saved:
            raise InputError(f"the config given differs from {folder.path / CONFIG_FILE}; "
                             "resume with no config (or the same one)")
    state = load_state(folder.path)
    folder.use_policy(saved.runtime)
    experiment = Experiment.build(saved, callbacks)
    try:
        experiment.trainer.load_state_dict(state["trainer"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"cannot resume: the saved state does not fit this config ({exc})") from exc
    history = folder.history_until(experiment.trainer.round_num)
    if state["trainer"]["history"] is None:
        experiment.trainer.history = history
    restore_rng(state["rng"])
    if overrides:
        folder.write_config(saved)
    return folder, experiment


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion, also from inside a running event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
        inside_a_loop = True
    except RuntimeError:
        inside_a_loop = False
    if not inside_a_loop:  # outside the except block: errors do not chain to this one
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="oiafed-run")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
