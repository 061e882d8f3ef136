"""What a resumed run may change: only what cannot change the meaning of the rounds already
trained (rounds, quorum, callbacks' arguments, runtime options); anything else is refused
before anything is written. A finished run resumed as it is keeps its summary's wall time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

import oiafed
from oiafed.cli import main
from oiafed.exceptions import ConfigError
from support import Interrupt, tiny_config, without_timing

CONFIG = tiny_config(
    data={"type": "digits", "num_clients": 6},
    trainer={"args": {"rounds": 4, "clients_per_round": 3}},
    callbacks=[{"type": "early_stopping", "args": {"patience": 50}}],
    runtime={"checkpoint_interval": 0},
)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def cut(tmp_path: Path) -> Path:
    """A run stopped after round 2 of 4."""
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=tmp_path / "cut", callbacks=[Interrupt(3)])
    return tmp_path / "cut"


@pytest.mark.parametrize(("override", "key"), [
    ("data.num_clients=20", "data.num_clients"),
    ("seed=5", "seed"),
    ("learner.args.lr=0.5", "learner.args.lr"),
    ("trainer.args.clients_per_round=2", "trainer.args.clients_per_round"),
    ("model.type=mlp", "model.type"),
    ("callbacks=[]", "callbacks"),
])
def test_an_override_that_changes_the_trained_rounds_is_refused_and_nothing_written(
        cut: Path, override: str, key: str) -> None:
    before = digest(cut)
    with pytest.raises(ConfigError, match="cannot be changed when resuming") as info:
        oiafed.run(None, resume=cut, overrides=[override])
    assert info.value.path == key
    assert digest(cut) == before


def test_the_cli_refuses_it_with_exit_2_naming_the_key(cut: Path, capsys) -> None:
    before = digest(cut)
    assert main(["run", "--resume", str(cut), "data.num_clients=20", "-q"]) == 2
    err = capsys.readouterr().err
    assert "data.num_clients" in err and "cannot be changed when resuming" in err
    assert digest(cut) == before


def test_rounds_callback_args_quorum_and_runtime_options_may_change(cut: Path, tmp_path) -> None:
    longer = {**CONFIG, "trainer": {"args": {"rounds": 6, "clients_per_round": 3}}}
    whole = oiafed.run(longer, run_dir=tmp_path / "whole")
    resumed = oiafed.run(None, resume=cut, overrides=[
        "trainer.args.rounds=6", "trainer.args.min_clients=2", "trainer.args.round_timeout=600",
        "callbacks.0.args.patience=40", "runtime.checkpoint_every=2", "runtime.workers=2"])
    assert resumed.rounds_completed == 6
    assert without_timing(resumed.history) == without_timing(whole.history)
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    assert saved["trainer"]["args"]["rounds"] == 6
    assert saved["callbacks"][0]["args"]["patience"] == 40


def test_an_override_equal_to_the_saved_value_is_no_change(cut: Path) -> None:
    same = ["data.num_clients=6", "data={type: digits, num_clients: 6}"]
    assert oiafed.run(None, resume=cut, overrides=same).rounds_completed == 4


def test_resuming_a_finished_run_keeps_its_wall_time(tmp_path: Path) -> None:
    oiafed.run(CONFIG, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["wall_time"] > 0
    again = oiafed.run(None, resume=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert again.wall_time == summary["wall_time"]


def test_a_resumed_run_adds_its_time_to_the_earlier_sessions(cut: Path) -> None:
    earlier = json.loads((cut / "summary.json").read_text())["wall_time"]
    assert earlier > 0  # the interrupted session's time is recorded too
    resumed = oiafed.run(None, resume=cut)
    assert resumed.wall_time > earlier
    assert json.loads((cut / "summary.json").read_text())["wall_time"] == resumed.wall_time
