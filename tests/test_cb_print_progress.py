"""print_progress: the seed page's example, built in."""

from __future__ import annotations

import asyncio
import io

import pytest
from rich.console import Console

import oiafed
from oiafed import registry
from oiafed.callbacks import CallbackManager, PrintProgressCallback, ProgressCallback
from oiafed.testing import FakeTrainer, make_round_result
from support import tiny_config


def test_it_is_registered_under_the_seed_name():
    assert registry.get("callback", "print_progress") is PrintProgressCallback


def test_prints_the_rounds_accuracy(capsys):
    printer = PrintProgressCallback()
    asyncio.run(printer.on_round_end(FakeTrainer(), 3, make_round_result(3, accuracy=0.912345)))
    asyncio.run(printer.on_round_end(FakeTrainer(), 4, make_round_result(4, train_loss=0.1)))
    assert capsys.readouterr().out == "Round 3: accuracy = 0.9123\nRound 4: accuracy = 0.0000\n"


def test_run_prints_one_line_per_round(tmp_path, capsys):
    config = tiny_config(callbacks=[{"type": "print_progress"}])
    result = oiafed.run(config, run_dir=tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Round")]
    assert lines == [f"Round {row['round']}: accuracy = {row['accuracy']:.4f}"
                     for row in result.history]


def _started_bar(trainer):
    bar = ProgressCallback(console=Console(file=io.StringIO(), force_terminal=True, width=100))
    asyncio.run(bar.on_train_start(trainer))
    for round_num in (1, 2):
        asyncio.run(bar.on_round_end(trainer, round_num, make_round_result(round_num, loss=0.5)))
    return bar


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("round failed")])
def test_progress_bar_is_stopped_when_the_run_ends_by_an_exception(error):
    trainer = FakeTrainer(rounds=5)
    bar = _started_bar(trainer)
    live = bar._progress
    assert live is not None and live.live.is_started
    manager = CallbackManager([bar], strict=True)
    asyncio.run(manager.on_exception(trainer, error))  # no on_train_end
    assert manager.errors == [] and bar._progress is None and not live.live.is_started
    assert "round    2  loss=0.5000" in bar.console.file.getvalue()


def test_progress_bar_stops_the_same_way_at_the_end_of_training():
    trainer = FakeTrainer(rounds=2)
    bar = _started_bar(trainer)
    live = bar._progress
    assert live is not None
    asyncio.run(bar.on_train_end(trainer, None))
    assert bar._progress is None and not live.live.is_started
    asyncio.run(bar.on_exception(trainer, KeyboardInterrupt()))  # after the end: harmless
