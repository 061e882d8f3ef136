"""Likely mistakes are not run silently: an empty config file is an error (exit 2), and a
sample size the federation cannot give is a warning naming the key and both numbers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import oiafed
from oiafed.cli import main
from support import tiny_config


@pytest.mark.parametrize("command", ["run", "validate"])
def test_an_empty_config_file_exits_2_saying_it_is_empty(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    Path("empty.yaml").write_text("# to do\n", encoding="utf-8")
    assert main([command, "empty.yaml"]) == 2
    assert "empty.yaml is empty" in capsys.readouterr().err
    assert not Path("runs").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(("trainer", "expected"), [
    ({"clients_per_round": 20},
     "trainer.args.clients_per_round is 20 but the federation has 4 clients"),
    ({"fraction": 0.1}, "trainer.args.fraction 0.1 of 4 clients rounds to 0"),
])
def test_a_clamped_sample_size_is_a_warning(tmp_path, caplog, trainer, expected):
    config = tiny_config(trainer={"args": {"rounds": 1, **trainer}})
    with caplog.at_level(logging.WARNING, logger="oiafed"):
        result = oiafed.run(config, run_dir=tmp_path / "run")
    assert [r.name for r in caplog.records if expected in r.getMessage()] == [
        "oiafed.core.trainer"]
    assert result.history[0]["num_clients"] == (4 if "clients_per_round" in trainer else 1)


def test_a_sample_size_that_fits_gives_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="oiafed"):
        oiafed.run(tiny_config(trainer={"args": {"rounds": 1, "clients_per_round": 4}}),
                   run_dir=tmp_path / "run")
    assert not [r for r in caplog.records if "trainer.args" in r.getMessage()]


def test_the_cli_shows_the_warning(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config()), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250", "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "oiafed.cli", "run", "tiny.yaml",
                           "trainer.args.rounds=1", "trainer.args.clients_per_round=20", "-q"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "trainer.args.clients_per_round is 20 but the federation has 4 clients" in done.stderr
