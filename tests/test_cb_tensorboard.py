"""tensorboard: real event files read back with TensorBoard's own reader."""

from __future__ import annotations

import asyncio
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import oiafed
from oiafed import ConfigError, registry
from oiafed.callbacks import Callback, CallbackManager, TensorBoardCallback
from oiafed.testing import FakeTrainer, make_round_result, run_rounds
from support import tiny_config


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def rounds(*accuracies: float) -> list[dict]:
    return [{"accuracy": a, "loss": 1.0 - a, "num_clients": 4, "note": "text", "flag": True}
            for a in accuracies]


def test_one_scalar_per_numeric_metric_per_round(tmp_path):
    board = TensorBoardCallback(log_dir="tb")
    run_rounds([board], rounds(0.5, 0.6, 0.7), trainer=FakeTrainer(run_dir=tmp_path))
    found = scalars(tmp_path / "tb")
    assert sorted(found) == ["accuracy", "loss", "num_clients"]  # text and bools are not scalars
    assert found["accuracy"] == [(1, pytest.approx(0.5)), (2, pytest.approx(0.6)),
                                 (3, pytest.approx(0.7))]
    assert found["num_clients"] == [(1, 4.0), (2, 4.0), (3, 4.0)]
    assert board.writer is None  # closed when training ended


def test_nothing_is_created_before_training_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    board = TensorBoardCallback()
    assert board.writer is None and list(tmp_path.iterdir()) == []
    asyncio.run(board.on_train_start(FakeTrainer()))  # no run_dir: ./runs in the cwd
    assert board.writer is not None and board.directory == tmp_path / "runs"
    board.close()


def test_each_round_is_on_disk_before_the_next_starts(tmp_path):
    trainer, board = FakeTrainer(run_dir=tmp_path), TensorBoardCallback(log_dir=str(tmp_path / "x"))
    asyncio.run(board.on_train_start(trainer))
    asyncio.run(board.on_round_end(trainer, 1, make_round_result(1, accuracy=0.25)))
    assert scalars(tmp_path / "x") == {"accuracy": [(1, 0.25)]}  # flushed, writer still open
    board.close()


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("round failed")])
def test_a_run_ended_by_an_exception_flushes_and_closes_the_event_file(tmp_path, error):
    trainer, board = FakeTrainer(run_dir=tmp_path), TensorBoardCallback(log_dir="tb")
    manager = CallbackManager([board], strict=True)

    async def failed_run():
        await manager.on_train_start(trainer)
        for round_num, accuracy in enumerate((0.5, 0.6, 0.7), start=1):
            await manager.on_round_end(trainer, round_num, make_round_result(
                round_num, accuracy=accuracy, loss=1.0 - accuracy))
        await manager.on_exception(trainer, error)  # the run dies: no on_train_end

    asyncio.run(failed_run())
    assert board.writer is None  # released, as on_train_end would
    assert manager.errors == []
    found = scalars(tmp_path / "tb")
    assert found["accuracy"] == [(1, pytest.approx(0.5)), (2, pytest.approx(0.6)),
                                 (3, pytest.approx(0.7))]
    assert found["loss"] == [(1, pytest.approx(0.5)), (2, pytest.approx(0.4)),
                             (3, pytest.approx(0.3))]


def test_on_exception_closes_the_writer_itself(tmp_path):
    trainer, board = FakeTrainer(run_dir=tmp_path), TensorBoardCallback(log_dir="tb")
    asyncio.run(board.on_train_start(trainer))
    asyncio.run(board.on_round_end(trainer, 1, make_round_result(1, accuracy=0.5)))
    writer = board.writer
    assert writer is not None
    writer.add_scalar("unflushed", 1.0, 1)  # written after the round's flush
    asyncio.run(board.on_exception(trainer, KeyboardInterrupt()))
    assert board.writer is None and writer.all_writers is None  # SummaryWriter.close() ran
    assert scalars(tmp_path / "tb") == {"accuracy": [(1, 0.5)], "unflushed": [(1, 1.0)]}
    asyncio.run(board.on_exception(trainer, KeyboardInterrupt()))  # twice: harmless


@pytest.mark.parametrize("value", [42, "", None])
def test_bad_log_dir_is_a_config_error(value):
    with pytest.raises(ConfigError, match="log_dir"):
        TensorBoardCallback(log_dir=value)


def test_yaml_builds_it():
    board = registry.build("callback", {"type": "tensorboard", "args": {"log_dir": "./runs"}})
    assert isinstance(board, TensorBoardCallback) and board.writer is None


@pytest.mark.parametrize("order", ["before", "after"])
def test_resume_hides_rounds_written_after_the_saved_state(tmp_path, order,
                                                          event_files_in_creation_order):
    trainer = FakeTrainer(run_dir=tmp_path)
    first = TensorBoardCallback(log_dir="tb")
    run_rounds([first], rounds(0.1, 0.2), trainer=trainer)
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved == {"last_round": 2}
    # The interrupted run went on to write rounds 3 and 4 before it died.
    run_rounds([first], rounds(0.3, 0.4), trainer=trainer)

    second = TensorBoardCallback(log_dir="tb")
    resumed = FakeTrainer(run_dir=tmp_path)
    if order == "before":
        second.load_state_dict(saved)
    else:
        asyncio.run(second.on_train_start(resumed))
        second.load_state_dict(saved)
    run_rounds([second], rounds(0.93, 0.94), trainer=resumed, start_round=3)

    found = scalars(tmp_path / "tb")
    assert [step for step, _ in found["accuracy"]] == [1, 2, 3, 4]
    assert [value for _, value in found["accuracy"]] == pytest.approx([0.1, 0.2, 0.93, 0.94])
    assert second.state_dict() == {"last_round": 4}


def test_run_writes_every_metric_of_every_round(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 3}}, callbacks=[
        {"type": "lr_scheduler", "args": {"scheduler_type": "step", "step_size": 1, "gamma": 0.5}},
        {"type": "tensorboard"}])
    result = oiafed.run(config, run_dir=tmp_path / "run")
    assert result.callback_errors == []
    found = scalars(tmp_path / "run" / "runs")
    expected_tags = set(result.history[0]) - {"round"}
    assert "lr" in expected_tags and set(found) == expected_tags
    for tag, points in found.items():
        assert points == [(row["round"], pytest.approx(row[tag], rel=1e-6)) for row in result.history]


def test_an_interrupted_run_closes_its_writer_with_every_round_so_far(tmp_path):
    class Interrupt(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            if round_num == 2:
                raise KeyboardInterrupt  # not an Exception: the manager lets it end the run

    board = TensorBoardCallback(log_dir="tb")
    config = tiny_config(trainer={"args": {"rounds": 4}})
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(config, run_dir=tmp_path / "run", callbacks=[board, Interrupt()])
    assert board.writer is None  # on_exception closed it
    found = scalars(tmp_path / "run" / "tb")
    assert [step for step, _ in found["accuracy"]] == [1, 2]
