"""Every code snippet of the seed page (docs/callbacks.zh.md) runs verbatim against oiafed."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
from abc import ABC
from pathlib import Path

import pytest
import yaml

import oiafed
from oiafed import Callback, CallbackManager, RoundResult, register, registry
from oiafed.callbacks.base import callback_label
from oiafed.run import Experiment
from support import RegistrySnapshot, tiny_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "callbacks.zh.md"
SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "callbacks.zh.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def snippet(marker: str) -> str:
    (found,) = [code for code in blocks("python") if marker in code]
    return found


def run_snippet(marker: str, **names) -> dict:
    """Execute a snippet as the page shows it, with the names the page takes as given."""
    namespace = {"__name__": "seed_page", "ABC": ABC, "List": list, "random": random,
                 "logger": logging.getLogger("seed_page"), "Callback": Callback,
                 "register": register, **names}
    exec(compile(snippet(marker), f"callbacks.zh.md[{marker}]", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def isolated_registry():
    with RegistrySnapshot():
        yield


def test_repo_copy_of_the_seed_page_is_verbatim():
    if not SEED.exists():
        pytest.skip("shared seed page not available")
    assert DOC.read_bytes() == SEED.read_bytes()


def test_callback_interface_matches_the_seed():
    seed_callback = run_snippet("class Callback(ABC)")["Callback"]
    assert issubclass(Callback, ABC)
    hooks = [n for n, f in vars(seed_callback).items() if inspect.iscoroutinefunction(f)]
    assert len(hooks) == 8
    for name in hooks:
        ours, theirs = getattr(Callback, name), getattr(seed_callback, name)
        assert inspect.iscoroutinefunction(ours), name
        shape = [(p.name, p.kind) for p in inspect.signature(theirs).parameters.values()]
        assert [(p.name, p.kind) for p in inspect.signature(ours).parameters.values()] == shape


def test_print_progress_example_runs(tmp_path, capsys):
    run_snippet('register("callback.print_progress")')
    config = tiny_config(callbacks=[{"type": "print_progress"}])
    result = oiafed.run(config, run_dir=tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Round")]
    assert lines == [f"Round {row['round']}: accuracy = {row['accuracy']:.4f}"
                     for row in result.history]


def test_early_stopping_snippet_registers_and_stops_a_run(tmp_path):
    seed_class = run_snippet('register("callback.early_stopping")')["EarlyStoppingCallback"]
    assert registry.get("callback", "early_stopping") is seed_class

    # The page leaves _is_improvement to the reader; supply it and run the page's YAML.
    @register("callback.early_stopping")
    class Completed(seed_class):
        def _is_improvement(self, current):
            return self.best is None or current > self.best + self.min_delta

    (yaml_block,) = [b for b in blocks("yaml") if "early_stopping" in b and "tensorboard" not in b
                     and "model_checkpoint" not in b]
    config = tiny_config(trainer={"args": {"rounds": 20}}, **yaml.safe_load(yaml_block))
    result = oiafed.run(config, run_dir=tmp_path / "run",
                        overrides=["callbacks.0.args.patience=2", "callbacks.0.args.min_delta=1.0"])
    assert result.rounds_completed == 3  # round 1 sets best; rounds 2 and 3 do not improve
    assert result.stopped_by == "early_stopping"


@pytest.mark.parametrize("marker, cls", [
    ('register("callback.model_checkpoint")', "ModelCheckpointCallback"),
    ('register("callback.lr_scheduler")', "LRSchedulerCallback"),
])
def test_builtin_sketches_define_and_register(marker, cls):
    namespace = run_snippet(marker)
    name = marker.split('"')[1].split(".", 1)[1]
    assert registry.get("callback", name) is namespace[cls]
    assert isinstance(namespace[cls](), Callback)


def test_tensorboard_snippet_writes_real_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_class = run_snippet('register("callback.tensorboard")')["TensorBoardCallback"]
    log_dir = tmp_path / "tb"
    board = seed_class(log_dir=str(log_dir))
    result = oiafed.run(tiny_config(), run_dir=tmp_path / "run", callbacks=[board])
    board.writer.close()  # the sketch never closes its writer
    events = EventAccumulator(str(log_dir))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("accuracy")]
    assert accuracy == [(row["round"], pytest.approx(row["accuracy"])) for row in result.history]


def test_adaptive_client_selection_steers_sampling(tmp_path):
    seed_class = run_snippet("adaptive_client_selection")["AdaptiveClientSelection"]

    class Completed(seed_class):  # the helpers the page leaves out
        def _update_score(self, client_id, score):
            self.client_scores[client_id] = score

        def _get_weights(self):
            if not self.client_scores:
                return None
            best = sorted(self.client_scores, key=self.client_scores.get, reverse=True)[:2]
            return {cid: 1.0 for cid in best}

    class Watch(Callback):
        def __init__(self):
            self.picked = {}

        async def on_aggregate_start(self, trainer, updates, **kwargs):
            self.picked[trainer.round_num] = {u.client_id for u in updates}

    selector, watch = Completed(exploration_rate=0.0), Watch()
    config = tiny_config(data={"type": "digits", "num_clients": 6},
                         trainer={"args": {"rounds": 4, "clients_per_round": 3}})
    oiafed.run(config, run_dir=tmp_path / "run", callbacks=[selector, watch])
    assert len(watch.picked[1]) == 3
    for round_num in (2, 3, 4):
        assert len(watch.picked[round_num]) == 2
        assert watch.picked[round_num] <= set(selector.client_scores)


def test_callback_manager_snippet_drives_oiafed_callbacks():
    seed_manager_class = run_snippet("class CallbackManager")["CallbackManager"]
    seen = []

    class Note(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            seen.append((round_num, result.metrics["accuracy"]))

    result = RoundResult(round_num=1, metrics={"accuracy": 0.5}, updates=[])
    asyncio.run(seed_manager_class([Note()]).on_round_end(object(), 1, result))
    asyncio.run(CallbackManager([Note()]).on_round_end(object(), 1, result))
    assert seen == [(1, 0.5), (1, 0.5)]


def test_should_stop_snippet_interrupts_training(tmp_path):
    my_callback = run_snippet("class MyCallback", some_condition=True)["MyCallback"]
    result = oiafed.run(tiny_config(trainer={"args": {"rounds": 5}}), run_dir=tmp_path / "run",
                        callbacks=[my_callback()])
    assert result.rounds_completed == 1
    assert result.stopped_by == "MyCallback"


def test_exception_handling_practice_keeps_training_going(tmp_path, caplog):
    hook = run_snippet("_save_to_external_service")["on_round_end"]

    def unreachable_service(self, result):
        raise ConnectionError("service down")

    External = type("External", (Callback,), {"on_round_end": hook,
                                              "_save_to_external_service": unreachable_service})
    with caplog.at_level(logging.WARNING, logger="seed_page"):
        result = oiafed.run(tiny_config(), run_dir=tmp_path / "run", callbacks=[External()])
    assert result.rounds_completed == 3 and result.callback_errors == []
    assert sum("Callback failed: service down" in r.getMessage() for r in caplog.records) == 3


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_configuration_reference_runs_verbatim_as_examples_callbacks_yaml(tmp_path):
    (reference,) = [b for b in blocks("yaml") if "tensorboard" in b]
    example = yaml.safe_load((EXAMPLES / "callbacks.yaml").read_text(encoding="utf-8"))
    assert reference in (EXAMPLES / "callbacks.yaml").read_text(encoding="utf-8")
    assert example["callbacks"] == yaml.safe_load(reference)["callbacks"]

    result = oiafed.run(EXAMPLES / "callbacks.yaml", run_dir=tmp_path / "run",
                        overrides=["trainer.args.rounds=3"])
    assert result.rounds_completed == 3
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert any((tmp_path / "run" / "runs").glob("events.out.tfevents.*"))
    rates = [row["lr"] for row in result.history]
    assert rates[0] == 0.1 and rates[0] > rates[1] > rates[2]


def test_callbacks_run_in_config_order(tmp_path):
    (order_block,) = [b for b in blocks("yaml") if "# 先执行" in b]
    config = oiafed.load_config(tiny_config(**yaml.safe_load(order_block)))
    manager = Experiment.build(config).callbacks
    assert [callback_label(cb) for cb in manager.callbacks] == ["early_stopping",
                                                                 "model_checkpoint"]
    result = oiafed.run(config, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert result.rounds_completed == 3
