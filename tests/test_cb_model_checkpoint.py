"""model_checkpoint: files, contents, atomic writes, keep_last, resume; then through oiafed.run."""

from __future__ import annotations

import asyncio
import io
import json
import os

import pytest
import torch

import oiafed
from oiafed import Callback, ConfigError, registry
from oiafed.callbacks import ModelCheckpointCallback
from oiafed.io import atomic_torch_save
from oiafed.testing import FakeTrainer, make_round_result, run_rounds
from support import tiny_config


def load(path):
    return torch.load(path, weights_only=True)


def rounds_of(*accuracies: float) -> list[dict[str, float]]:
    return [{"accuracy": a, "loss": 1.0 - a, "num_clients": 4} for a in accuracies]


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("args, words", [
    ({"mode": "best"}, ["mode", "max, min", "'best'"]),
    ({"save_every": -1}, ["save_every", ">= 0", "-1"]),
    ({"keep_last": 0}, ["keep_last", ">= 1", "0"]),
    ({"save_best": "no"}, ["save_best", "'no'"]),
    ({"metric": None}, ["metric", "None"]),
    ({"save_dir": ""}, ["save_dir", "''"]),
])
def test_bad_arguments_are_config_errors(args, words):
    with pytest.raises(ConfigError) as info:
        ModelCheckpointCallback(**args)
    for word in words:
        assert word in str(info.value)


def test_seed_defaults():
    saver = ModelCheckpointCallback()
    assert (saver.save_dir, saver.save_best, saver.save_every, saver.metric, saver.mode) == (
        "./checkpoints", True, 10, "accuracy", "max")
    assert saver.keep_last is None


def test_periodic_best_and_last_files_hold_that_rounds_weights(tmp_path):
    trainer = FakeTrainer(run_dir=tmp_path)
    saver = ModelCheckpointCallback(save_every=2, keep_last=2)
    run_rounds([saver], rounds_of(0.5, 0.7, 0.6, 0.8, 0.8, 0.75, 0.7), trainer=trainer)
    folder = tmp_path / "checkpoints"
    assert files(folder) == ["best.pt", "last.pt", "round_0004.pt", "round_0006.pt"]
    expected_round = {"best.pt": 4, "last.pt": 7, "round_0004.pt": 4, "round_0006.pt": 6}
    for name, round_num in expected_round.items():
        saved = load(folder / name)
        assert set(saved) == {"weights", "round", "metrics", "metric"}
        assert saved["round"] == round_num and saved["metric"] == "accuracy"
        assert set(saved["weights"]) == set(trainer.model.state_dict())
        assert all(torch.all(t == float(round_num)) for t in saved["weights"].values())
        row = trainer.history[round_num - 1]
        assert saved["metrics"] == {k: float(v) for k, v in row.items() if k != "round"}
    assert (saver.best, saver.best_round) == (0.8, 4)


def test_loaded_weights_fit_the_model(tmp_path):
    trainer = FakeTrainer(run_dir=tmp_path)
    run_rounds([ModelCheckpointCallback()], rounds_of(0.5, 0.6), trainer=trainer)
    fresh = FakeTrainer().model
    fresh.load_state_dict(load(tmp_path / "checkpoints" / "best.pt")["weights"])
    assert all(torch.all(p == 2.0) for p in fresh.parameters())


def test_mode_min_and_no_periodic_files(tmp_path):
    rounds = [{"loss": v, "accuracy": 0.0} for v in (1.0, 0.5, 0.7)]
    saver = ModelCheckpointCallback(save_every=0, metric="loss", mode="min", save_dir="ck")
    run_rounds([saver], rounds, trainer=FakeTrainer(run_dir=tmp_path))
    assert files(tmp_path / "ck") == ["best.pt", "last.pt"]
    assert load(tmp_path / "ck" / "best.pt")["round"] == 2


def test_save_best_false_needs_no_metric(tmp_path):
    saver = ModelCheckpointCallback(save_best=False, save_every=1, metric="nothing_like_it")
    run_rounds([saver], [{"accuracy": 0.5, "loss": 1.0}] * 2, trainer=FakeTrainer(run_dir=tmp_path))
    assert files(tmp_path / "checkpoints") == ["last.pt", "round_0001.pt", "round_0002.pt"]


def test_relative_dir_without_run_dir_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_rounds([ModelCheckpointCallback(save_dir="./here")], rounds_of(0.5))
    assert files(tmp_path / "here") == ["best.pt", "last.pt"]


def test_absolute_dir_ignores_run_dir(tmp_path):
    target = tmp_path / "elsewhere"
    run_rounds([ModelCheckpointCallback(save_dir=str(target))], rounds_of(0.5),
               trainer=FakeTrainer(run_dir=tmp_path / "run"))
    assert files(target) == ["best.pt", "last.pt"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unevaluated_rounds_are_never_best_and_a_missing_metric_is_reported(tmp_path):
    trainer = FakeTrainer(run_dir=tmp_path)
    saver = ModelCheckpointCallback(metric="f1")
    asyncio.run(saver.on_round_end(trainer, 1, make_round_result(1, train_loss=0.3)))
    assert files(tmp_path / "checkpoints") == ["last.pt"]
    trainer.fake_train(2)
    with pytest.raises(ConfigError, match=r"'f1'.*accuracy, loss, train_loss"):
        asyncio.run(saver.on_round_end(trainer, 2, make_round_result(2, accuracy=0.5, loss=1.0,
                                                                      train_loss=0.2)))
    assert load(tmp_path / "checkpoints" / "last.pt")["round"] == 2  # still written


def good_round_then(tmp_path, fail):
    """Save round 1, break saving with ``fail``, try round 2 with a better metric."""
    trainer = FakeTrainer(run_dir=tmp_path)
    saver = ModelCheckpointCallback(save_every=1)
    trainer.fake_train(1)
    asyncio.run(saver.on_round_end(trainer, 1, make_round_result(1, accuracy=0.5, loss=1.0)))
    before = {name: (tmp_path / "checkpoints" / name).read_bytes() for name in
              ("best.pt", "last.pt", "round_0001.pt")}
    trainer.fake_train(2)
    with fail(), pytest.raises(OSError, match="disk full"):
        asyncio.run(saver.on_round_end(trainer, 2, make_round_result(2, accuracy=0.9, loss=0.1)))
    return saver, before


@pytest.fixture
def breaker(monkeypatch):
    """Context-manager factories that make the next checkpoint write fail."""
    from contextlib import contextmanager

    @contextmanager
    def replace_fails():
        def refuse(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", refuse)
        yield
        monkeypatch.undo()

    @contextmanager
    def save_dies_half_way():
        real_save = torch.save

        def half(obj, handle, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", half)
        yield
        monkeypatch.undo()

    return {"os.replace raises": replace_fails, "torch.save dies half-way": save_dies_half_way}


@pytest.mark.parametrize("how", ["os.replace raises", "torch.save dies half-way"])
def test_an_interrupted_write_leaves_the_previous_good_file(tmp_path, breaker, how):
    saver, before = good_round_then(tmp_path, breaker[how])
    folder = tmp_path / "checkpoints"
    assert files(folder) == ["best.pt", "last.pt", "round_0001.pt"]  # no temp files left over
    assert (folder / "round_0001.pt").read_bytes() == before["round_0001.pt"]
    for name in ("best.pt", "last.pt"):
        assert (folder / name).read_bytes() == before[name]
        saved = load(folder / name)
        assert saved["round"] == 1 and all(torch.all(t == 1.0) for t in saved["weights"].values())
    assert saver.best_round == 1  # the failed round did not become the best


def test_atomic_torch_save_replaces_in_one_step(tmp_path):
    target = tmp_path / "deep" / "x.pt"
    atomic_torch_save({"a": torch.arange(3)}, target)
    atomic_torch_save({"a": torch.arange(4)}, target)
    assert torch.equal(load(target)["a"], torch.arange(4))
    assert files(target.parent) == ["x.pt"]


YAML = {"type": "model_checkpoint", "args": {"save_every": 2, "keep_last": 2, "save_dir": "ck"}}
SERIES = rounds_of(0.5, 0.7, 0.6, 0.8, 0.8, 0.75, 0.9, 0.6, 0.85)


def snapshot(folder):
    return {name: (load(folder / name)["round"], load(folder / name)["metrics"])
            for name in files(folder)}


@pytest.mark.parametrize("cut", [2, 3, 5])
def test_resume_from_state_continues_like_an_uninterrupted_run(tmp_path, cut):
    whole = registry.build("callback", YAML)
    run_rounds([whole], SERIES, trainer=FakeTrainer(run_dir=tmp_path / "a"))

    first = registry.build("callback", YAML)
    run_rounds([first], SERIES[:cut], trainer=FakeTrainer(run_dir=tmp_path / "b"))
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    second = registry.build("callback", YAML)
    second.load_state_dict(saved)
    run_rounds([second], SERIES[cut:], trainer=FakeTrainer(run_dir=tmp_path / "b"),
               start_round=cut + 1)

    assert snapshot(tmp_path / "b" / "ck") == snapshot(tmp_path / "a" / "ck")
    assert second.state_dict() == whole.state_dict()
    assert files(tmp_path / "a" / "ck") == ["best.pt", "last.pt", "round_0006.pt", "round_0008.pt"]


# --- through oiafed.run -------------------------------------------------------------------


class WeightLog(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        self.weights[round_num] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_run_writes_checkpoints_of_the_global_model_in_the_run_folder(tmp_path):
    log = WeightLog()
    config = tiny_config(trainer={"args": {"rounds": 4}}, callbacks=[
        {"type": "model_checkpoint", "args": {"save_every": 2, "keep_last": 1}}])
    result = oiafed.run(config, run_dir=tmp_path / "run", callbacks=[log])
    folder = tmp_path / "run" / "checkpoints"
    assert files(folder) == ["best.pt", "last.pt", "round_0004.pt"]
    best = result.best("accuracy")["round"]
    for name, round_num in {"best.pt": best, "last.pt": 4, "round_0004.pt": 4}.items():
        saved = load(folder / name)
        assert saved["round"] == round_num
        assert set(saved["weights"]) == set(log.weights[round_num])
        for key, tensor in saved["weights"].items():
            assert torch.equal(tensor, log.weights[round_num][key])
        row = result.history[round_num - 1]
        assert saved["metrics"] == pytest.approx({k: v for k, v in row.items() if k != "round"})
    final = load(folder / "last.pt")["weights"]
    assert all(torch.equal(final[k], result.weights[k]) for k in final)
