"""print_progress: the seed page's example, built in."""

from __future__ import annotations

import asyncio

import oiafed
from oiafed import registry
from oiafed.callbacks import PrintProgressCallback
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
