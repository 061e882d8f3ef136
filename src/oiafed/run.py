"""config -> components -> runtime -> ``TrainResult`` and a run folder."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from oiafed import registry
from oiafed.callbacks.base import CallbackManager, overrides
from oiafed.callbacks.report import report_at_end
from oiafed.config import ExperimentConfig, fill_defaults, load_config
from oiafed.core.client_states import ClientStates
from oiafed.core.trainer import Trainer
from oiafed.core.types import TrainResult
from oiafed.data.federated import FederatedSource, build_federated_data
from oiafed.device import (
    apply_determinism,
    check_precision,
    learner_device_name,
    record,
    resolve_device,
    server_device,
)
from oiafed.exceptions import ConfigError, InputError
from oiafed.run_folder import CLIENT_STATES, RunFolder
from oiafed.run_folder import CONFIG as CONFIG_FILE
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
    def build(cls, cfg: ExperimentConfig, extra_callbacks: list[Any] | None = None,
              data: FederatedSource | None = None) -> Experiment:
        """Build the run's parts (``data``: ``cfg``'s, built already; None: built here).
        Devices are checked first: ``device`` (the server's) and, for learners on this
        machine (serial, parallel), ``runtime.device`` and ``precision``.

        Raises:
            ConfigError: naming the key, for a device not available here.
        """
        server = server_device(cfg.device)
        learners_here = cfg.runtime.mode in ("serial", "parallel")
        if learners_here:
            key = "runtime.device" if cfg.runtime.device else "device"
            check_precision(cfg.precision, resolve_device(learner_device_name(cfg), key))
        apply_determinism(cfg.deterministic)
        data = data if data is not None else build_federated_data(cfg.data, cfg.seed)
        model = build_model(cfg, data)
        manager = CallbackManager([*build_callbacks(cfg), *(extra_callbacks or [])],
                                  strict=cfg.strict)
        if cfg.runtime.mode != "serial":
            _warn_driver_only_hooks(cfg.runtime.mode, extra_callbacks or [])
        worker = None  # learners in other processes build their own from the config
        if cfg.runtime.mode == "serial":
            worker = ClientWorker.from_config(cfg, callbacks=manager, data=data, model=model)
        learner = (worker.learner if worker is not None
                   else registry.build("learner", cfg.learner.model_dump(), "learner"))
        model.to(server)
        trainer = registry.build("trainer", cfg.trainer.model_dump(), "trainer")
        trainer.device = server
        trainer.fit_config["lr"] = learner.lr
        trainer.local_epochs = learner.epochs
        attack = (registry.build("attack", cfg.attack.model_dump(), "attack")
                  if cfg.attack is not None else None)
        if cfg.privacy is not None:
            trainer.privacy = registry.build("privacy", cfg.privacy.model_dump(), "privacy")
            trainer.privacy.check_model(model, cfg.model.type)
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
            attack=attack,
            # Simulated clients train the server's partition; deployed ones may bring their
            # own data (--local-data), whose size the server cannot know.
            client_size=None if deployed(cfg) else data.client_size,
        )
        return cls(cfg, data, trainer, manager)


def model_input(data: FederatedSource) -> dict[str, Any]:
    """What building the model takes from the data, as ``partition.json`` records it for
    ``oiafed.load_model``: ``input_shape`` and ``num_classes``."""
    return {"input_shape": list(data.input_shape), "num_classes": int(data.num_classes)}


def deployed(cfg: ExperimentConfig) -> bool:
    """Whether the clients are processes started elsewhere (``oiafed server``: ``grpc`` with
    ``runtime.address``) rather than simulated by this run from its partition."""
    return cfg.runtime.mode == "grpc" and bool(cfg.runtime.address)


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
            With ``resume``, only keys of ``RESUMABLE_CHANGES`` may change.

    Returns:
        The ``TrainResult`` (history, stop reason, final weights, run folder).

    Raises:
        ConfigError: when the config is invalid, or a resume override changes a key that
            would change what the rounds already trained mean (nothing is written).
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
        folder.write_partition({"model_input": model_input(experiment.data),
                                **experiment.data.report()})
    trainer = experiment.trainer
    trainer.client_states = ClientStates(folder.path / CLIENT_STATES)
    if resume is not None:
        trainer.client_states.restore(trainer.round_num)
        folder.durable_round = trainer.round_num
    folder.device = record(experiment.config, trainer.device)
    trainer.recorder = folder
    trainer.run_dir = folder.path
    if experiment.config.report:
        folder.at_end.append(report_at_end)
    first_round = trainer.round_num
    earlier = folder.wall_time() if resume is not None else 0.0
    folder.start_log()
    logger.info("run folder: %s", folder.path)
    started = time.perf_counter()
    try:
        result = run_coroutine(trainer.fit())
    except BaseException as exc:
        _end_failed(folder, trainer, exc, earlier + time.perf_counter() - started)
        raise
    result.run_dir = folder.path
    # A resumed run's wall time adds to the earlier sessions'; one that trained no round
    # (a finished run resumed as it is) keeps theirs.
    result.wall_time = earlier + (result.wall_time if trainer.round_num > first_round else 0.0)
    try:
        if not folder.saved_round(trainer.round_num):
            folder.save_state(trainer)
    finally:
        folder.close()
    folder.collect_client_states(trainer)
    folder.write_summary(result)
    folder.run_at_end()
    return result


def _end_failed(folder: RunFolder, trainer: Trainer, exc: BaseException,
                wall_time: float) -> None:
    """After a run ended by ``exc``: the state of the last completed round on disk, a summary
    saying why it stopped, and how to resume it in the log."""
    interrupted = isinstance(exc, KeyboardInterrupt | asyncio.CancelledError)
    reason = "interrupted" if interrupted else f"failed: {type(exc).__name__}: {exc}"
    result = trainer.result(stop_reason=reason, wall_time=wall_time)
    result.run_dir = folder.path
    folder.log_failure(exc, reason)
    try:
        folder.save_pending()
    finally:
        folder.close()
    folder.collect_client_states(trainer)
    if result.rounds_completed == 0 and folder.new and not folder.has_state() and folder.discard():
        return  # a failed start leaves no folder that blocks --run-dir
    folder.write_summary(result)
    folder.run_at_end()
    if folder.has_state():
        logger.warning("the run %s after round %d; its state is saved in %s: continue it "
                       "with --resume %s", "was interrupted" if interrupted else "failed",
                       result.rounds_completed, folder.path, folder.path)
    elif folder.checkpoint_every:
        logger.warning("the run %s after round %d, before its first save; --resume %s starts "
                       "it again", "was interrupted" if interrupted else "failed",
                       result.rounds_completed, folder.path)


def _resume(
    config: Any, run_dir: Path, callbacks: list[Any] | None, overrides: Any
) -> tuple[RunFolder, Experiment]:
    """Rebuild a run from its folder and saved state; change nothing on disk until all is read
    and checked (config, state file, metrics), so a failed resume leaves the folder as it was."""
    folder = RunFolder.open(run_dir)
    saved = load_config(folder.path / CONFIG_FILE, overrides)
    if overrides:
        check_resume_changes(load_config(folder.path / CONFIG_FILE), saved)
    if config is not None:
        given = load_config(config, overrides)
        if fill_defaults(given) != fill_defaults(saved):
            raise InputError(f"the config given differs from {folder.path / CONFIG_FILE}; "
                             "resume with no config (or the same one)")
    state = _saved_state(folder, saved)
    folder.use_policy(saved.runtime)
    if state is None:
        seed_global_generators(saved.seed)
    experiment = Experiment.build(saved, callbacks)
    if state is not None:
        try:
            experiment.trainer.load_state_dict(state["trainer"])
        except Exception as exc:  # a component's load_state_dict may raise anything
            raise InputError(f"cannot resume: the saved state does not fit this config ({exc})") from exc
    history = folder.history_until(experiment.trainer.round_num)
    privacy = experiment.trainer.privacy
    if privacy is not None:  # rounds to redo were released all the same
        privacy.count_released(folder.read_metrics(),
                               folder.client_rows_after(experiment.trainer.round_num))
    # All is read and checked: from here on the folder changes (run() then drops the client
    # state versions after the round resumed from).
    if state is not None:
        if state["trainer"]["history"] is None:
            experiment.trainer.history = history
        restore_rng(state["rng"])
        if privacy is not None:  # what it counted survives the rows of the rounds to redo
            folder.save_state_now(experiment.trainer)
    folder.keep_rounds(experiment.trainer.round_num, history)
    if state is None:
        logger.warning("%s has no saved state yet (the run stopped before its first save): "
                       "it starts again from round 1", folder.path)
    if overrides:
        folder.write_config(saved)
    return folder, experiment


def _saved_state(folder: RunFolder, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The run's saved state, or None for a run stopped before its first save (no state
    file, no round recorded after the first that saves one): it starts again in place.

    Raises:
        InputError: when the state is missing but must have been saved (or is corrupt).
    """
    every = cfg.runtime.checkpoint_every
    if not folder.has_state() and every > 0 and all(
            row.get("round", 0) <= every for row in folder.read_metrics()):
        return None
    return load_state(folder.path)


RESUMABLE_CHANGES = (
    "trainer.args.rounds", "trainer.args.min_clients", "trainer.args.round_timeout",
    "trainer.args.max_update_norm_ratio",
    "callbacks.*.args", "callbacks.*.args.*", "logging", "logging.*", "console", "console.*",
    *(f"runtime.{name}" for name in ("mode", "workers", "threads", "checkpoint_every",
                                     "checkpoint_interval", "address", "min_join",
                                     "join_timeout", "hello_timeout", "max_streams",
                                     "max_task_bytes", "num_cpus_per_client",
                                     "num_gpus_per_client", "device", "resident")),
    "device", "deterministic", "report",
)
"""Config keys a resumed run may change (``fnmatch`` patterns; list items by index): none of
them changes what the rounds already trained mean."""


def check_resume_changes(before: ExperimentConfig, after: ExperimentConfig) -> None:
    """Refuse overrides of a resumed run that change anything but ``RESUMABLE_CHANGES``.

    Raises:
        ConfigError: naming the first key changed that is not allowed, and both values.
    """
    changes = _changes(fill_defaults(before).model_dump(mode="json"),
                       fill_defaults(after).model_dump(mode="json"))
    for key, old, new in changes:
        if not any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_CHANGES):
            raise ConfigError(
                f"cannot be changed when resuming ({old!r} -> {new!r}): the rounds already "
                "trained would mean something else. A resumed run may change only "
                "trainer.args.rounds, min_clients and round_timeout, callbacks' args and "
                "runtime options; start a new run for this change", key)


def _changes(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` of every value that differs (absent: None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for name in [*old, *(k for k in new if k not in old)]
                for change in _changes(old.get(name), new.get(name), f"{key}.{name}".lstrip("."))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [change for i, (a, b) in enumerate(zip(old, new, strict=True))
                for change in _changes(a, b, f"{key}.{i}")]
    return [] if old == new else [(key or "(config)", old, new)]


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
