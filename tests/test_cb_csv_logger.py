"""csv_logger: one row per round, columns that appear later, resume; then through oiafed.run."""

from __future__ import annotations

import asyncio
import csv
import json

import pytest

import oiafed
from oiafed import ConfigError, registry
from oiafed.callbacks import CallbackManager, CSVLoggerCallback
from oiafed.testing import FakeTrainer, make_round_result, run_rounds
from support import tiny_config


def read(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_one_row_per_round_in_full_precision(tmp_path):
    metrics = [{"accuracy": 1 / 3, "loss": 2 / 3, "num_clients": 4},
               {"accuracy": 0.1 + 0.2, "loss": float("nan"), "num_clients": 4}]
    run_rounds([CSVLoggerCallback()], metrics, trainer=FakeTrainer(run_dir=tmp_path))
    header, rows = read(tmp_path / "metrics.csv")
    assert header == ["round", "accuracy", "loss", "num_clients"]
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[0]["accuracy"]) == 1 / 3 and float(rows[1]["accuracy"]) == 0.1 + 0.2
    assert rows[1]["loss"] == "nan" and rows[0]["num_clients"] == "4"


def test_metrics_that_appear_later_add_columns_and_earlier_rows_get_empty_cells(tmp_path):
    metrics = [{"train_loss": 1.0}, {"train_loss": 0.9, "accuracy": 0.5, "loss": 1.2},
               {"train_loss": 0.8}, {"train_loss": 0.7, "lr": 0.01, "accuracy": 0.6}]
    logger = CSVLoggerCallback(filename="logs/m.csv")
    run_rounds([logger], metrics, trainer=FakeTrainer(run_dir=tmp_path))
    header, rows = read(tmp_path / "logs" / "m.csv")
    assert header == ["round", "train_loss", "accuracy", "loss", "lr"]
    assert [tuple(r.values()) for r in rows] == [
        ("1", "1.0", "", "", ""),
        ("2", "0.9", "0.5", "1.2", ""),
        ("3", "0.8", "", "", ""),
        ("4", "0.7", "0.6", "", "0.01"),
    ]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["m.csv"]  # no temp files


def test_a_fresh_run_replaces_an_old_file(tmp_path):
    (tmp_path / "metrics.csv").write_text("old,stuff\n1,2\n")
    run_rounds([CSVLoggerCallback()], [{"accuracy": 0.5}], trainer=FakeTrainer(run_dir=tmp_path))
    assert read(tmp_path / "metrics.csv") == (["round", "accuracy"], [{"round": "1", "accuracy": "0.5"}])


def test_relative_filename_without_run_dir_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_rounds([CSVLoggerCallback("out.csv")], [{"loss": 1.0}])
    assert read(tmp_path / "out.csv")[0] == ["round", "loss"]


def test_a_run_ended_by_an_exception_leaves_every_row_on_disk(tmp_path):
    trainer, logger = FakeTrainer(run_dir=tmp_path), CSVLoggerCallback()
    manager = CallbackManager([logger], strict=True)
    metrics = [{"loss": 0.9}, {"loss": 0.8, "accuracy": 0.5}, {"loss": 0.7}]

    async def failed_run():
        await manager.on_train_start(trainer)
        for round_num, values in enumerate(metrics, start=1):
            await manager.on_round_end(trainer, round_num, make_round_result(round_num, values))
        await manager.on_exception(trainer, KeyboardInterrupt())  # no on_train_end

    asyncio.run(failed_run())
    assert manager.errors == []
    assert read(tmp_path / "metrics.csv") == (["round", "loss", "accuracy"], [
        {"round": "1", "loss": "0.9", "accuracy": ""},
        {"round": "2", "loss": "0.8", "accuracy": "0.5"},
        {"round": "3", "loss": "0.7", "accuracy": ""},
    ])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temp files


@pytest.mark.parametrize("value", ["", "folder/", 3, None])
def test_bad_filename_is_a_config_error(value):
    with pytest.raises(ConfigError, match="filename"):
        CSVLoggerCallback(filename=value)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_resume_keeps_rows_up_to_the_saved_round_and_drops_later_ones(tmp_path, cut):
    series = [{"loss": 1.0 - r / 10, **({"accuracy": r / 10} if r >= 2 else {})} for r in range(1, 6)]
    yaml = {"type": "csv_logger", "args": {"filename": "m.csv"}}
    whole = registry.build("callback", yaml)
    run_rounds([whole], series, trainer=FakeTrainer(run_dir=tmp_path / "a"))

    first = registry.build("callback", yaml)
    trainer = FakeTrainer(run_dir=tmp_path / "b")
    run_rounds([first], series[:cut], trainer=trainer)
    saved = json.loads(json.dumps(first.state_dict()))
    # The interrupted run wrote two more rounds, with other numbers, before it died.
    run_rounds([first], [{"loss": 9.0, "accuracy": 9.0, "extra": 1}] * 2, trainer=trainer)

    second = registry.build("callback", yaml)
    second.load_state_dict(saved)
    run_rounds([second], series[cut:], trainer=FakeTrainer(run_dir=tmp_path / "b"),
               start_round=cut + 1)
    assert read(tmp_path / "b" / "m.csv")[1] == read(tmp_path / "a" / "m.csv")[1]
    assert [r["round"] for r in read(tmp_path / "b" / "m.csv")[1]] == ["1", "2", "3", "4", "5"]


def test_run_writes_metrics_csv_in_the_run_folder(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 4, "eval_every": 2}},
                         callbacks=[{"type": "csv_logger"}])
    result = oiafed.run(config, run_dir=tmp_path / "run")
    header, rows = read(tmp_path / "run" / "metrics.csv")
    assert header[0] == "round" and set(header) == set(result.history[1])
    assert len(rows) == len(result.history) == 4
    for row, expected in zip(rows, result.history, strict=True):
        for key in header:
            assert (float(row[key]) if row[key] else None) == expected.get(key)
    assert rows[0]["accuracy"] == "" and rows[1]["accuracy"] != ""


def test_tensor_and_numpy_scalars_are_written_as_numbers(tmp_path):
    import numpy as np
    import torch

    metrics = [{"a": torch.tensor(0.5), "b": np.float32(0.25), "c": "text", "d": None}]
    run_rounds([CSVLoggerCallback()], metrics, trainer=FakeTrainer(run_dir=tmp_path))
    assert read(tmp_path / "metrics.csv")[1] == [{"round": "1", "a": "0.5", "b": "0.25",
                                                  "c": "text", "d": ""}]
