"""Paths from a state file or a config never reach outside the run folder (issue 14, items 4
and 8): a tampered ``model_checkpoint`` state deletes nothing of the user's, and a relative
callback path that climbs out of the run folder is refused before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load as load_tensors

import oiafed
from oiafed import CallbackError, ConfigError
from oiafed.callbacks import CSVLoggerCallback, ModelCheckpointCallback, TensorBoardCallback
from oiafed.state import STATE_FILE, STATE_KEY, encode_state, load_state
from oiafed.testing import FakeTrainer, run_rounds
from support import tiny_config

ROUNDS = [{"accuracy": 0.5, "loss": 0.5}] * 3


def victims(tmp_path: Path) -> dict[str, Path]:
    """Files of the user next to (not in) the run folder ``tmp_path/run``."""
    found = {"absolute": tmp_path / "precious.txt", "dotdot": tmp_path / "sibling.txt",
             "in_run": tmp_path / "run" / "notes.txt",
             "in_checkpoints": tmp_path / "run" / "checkpoints" / "mine.pt"}
    for path in found.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")
    return found


def hostile_list(found: dict[str, Path]) -> list[object]:
    """What a crafted state may hold as the periodic files kept: every way out, and junk."""
    return [str(found["absolute"]), "../../sibling.txt", "../notes.txt", "mine.pt",
            "sub/round_0001.pt", "round_0001.pt/../../../precious.txt", 7, None]


def test_a_tampered_periodic_list_deletes_nothing_but_its_own_files(tmp_path, caplog):
    found = victims(tmp_path)
    saver = ModelCheckpointCallback(save_every=1, keep_last=1)
    with caplog.at_level(logging.WARNING, logger="oiafed.callbacks.model_checkpoint"):
        saver.load_state_dict({"metric": "accuracy", "mode": "max", "best": None,
                               "best_round": None, "periodic": hostile_list(found),
                               "last_round": 0})
        run_rounds([saver], ROUNDS, trainer=FakeTrainer(run_dir=tmp_path / "run"))
    assert all(path.read_text() == "keep me" for path in found.values())
    # its own files are still pruned as keep_last says
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "mine.pt", "round_0003.pt"]
    assert saver.periodic == ["round_0003.pt"]
    assert "ignored" in caplog.text and "precious.txt" in caplog.text


def test_the_saved_list_keeps_exactly_the_names_it_gives():
    saver = ModelCheckpointCallback(save_every=1, keep_last=2)
    saver.load_state_dict({"periodic": ["round_0001.pt", "round_12345.pt", "round_1.pt",
                                        "round_00012.pt", f"round_{'9' * 5000}.pt",
                                        "round_0002.pt"]})
    assert saver.periodic == ["round_0001.pt", "round_12345.pt", "round_0002.pt"]


def rewrite_state(run_dir: Path, change) -> None:
    """Edit the JSON part of a run's state file in place, as an attacker who can write the
    file would (the checksum recomputed: it detects damage, it is no signature)."""
    file = run_dir / STATE_FILE
    data = file.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    tree = json.loads(header["__metadata__"][STATE_KEY])
    change(tree)
    file.write_bytes(encode_state(json.dumps(tree), load_tensors(data)))


@pytest.mark.slow
def test_a_tampered_state_file_resumes_without_deleting_outside_files(tmp_path):
    found = victims(tmp_path)
    config = tiny_config(trainer={"args": {"rounds": 2}}, callbacks=[
        {"type": "model_checkpoint", "args": {"save_every": 1, "keep_last": 1}}])
    oiafed.run(config, run_dir=tmp_path / "run")

    def plant(tree):
        tree["trainer"]["callbacks"]["model_checkpoint"]["periodic"] = hostile_list(found)

    rewrite_state(tmp_path / "run", plant)
    assert load_state(tmp_path / "run")["trainer"]["callbacks"]["model_checkpoint"][
        "periodic"][0] == str(found["absolute"])
    result = oiafed.run(None, resume=tmp_path / "run", overrides=["trainer.args.rounds=4"])
    assert result.rounds_completed == 4
    assert all(path.read_text() == "keep me" for path in found.values())
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "mine.pt", "round_0002.pt", "round_0004.pt"]


# --- relative paths in the config stay inside the run folder ------------------------------

ESCAPES = [
    ("model_checkpoint", "save_dir", "../.."),
    ("model_checkpoint", "save_dir", "ck/../../../out"),
    ("tensorboard", "log_dir", "../tb"),
    ("csv_logger", "filename", "../metrics.csv"),
]


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("kind, key, value", ESCAPES)
def test_a_relative_path_out_of_the_run_folder_is_refused_naming_the_key(
        tmp_path, kind, key, value):
    config = tiny_config(trainer={"args": {"rounds": 1}}, callbacks=[
        {"type": "print_progress"}, {"type": kind, "args": {key: value}}])
    where = tmp_path / "a" / "b"
    where.mkdir(parents=True)
    for check in (lambda: oiafed.validate(config),
                  lambda: oiafed.run(config, run_dir=where / "run")):
        with pytest.raises(ConfigError) as info:
            check()
        assert info.value.path == f"callbacks[1].args.{key}"
        assert value in str(info.value) and "run folder" in str(info.value)
    assert everything_under(tmp_path) == ["a", "a/b"]  # no run folder, nothing outside it


@pytest.mark.parametrize("make, value", [
    (lambda v: ModelCheckpointCallback(save_dir=v), "../x"),
    (lambda v: TensorBoardCallback(log_dir=v), "a/../../x"),
    (lambda v: CSVLoggerCallback(filename=v), "../../x.csv"),
])
def test_a_callback_built_in_code_refuses_an_escaping_path(make, value):
    with pytest.raises(ConfigError, match="run folder"):
        make(value)


def test_only_the_escaping_path_is_refused_at_train_start(tmp_path):
    """A path set after ``__init__`` is checked where it is resolved; one that stays inside
    once normalised, or an absolute one, is used as given."""
    inside = ModelCheckpointCallback(save_dir="ck/../ck2", save_every=1)
    outside = ModelCheckpointCallback(save_dir=str(tmp_path / "elsewhere" / ".." / "abs"))
    for saver in (inside, outside):
        run_rounds([saver], ROUNDS[:1], trainer=FakeTrainer(run_dir=tmp_path / "run"))
    assert (tmp_path / "run" / "ck2" / "round_0001.pt").is_file()
    assert (tmp_path / "abs" / "last.pt").is_file()

    escaping = ModelCheckpointCallback()
    escaping.save_dir = "../out"
    with pytest.raises(CallbackError, match="on_train_start") as info:
        run_rounds([escaping], ROUNDS[:1], trainer=FakeTrainer(run_dir=tmp_path / "run"))
    assert isinstance(info.value.__cause__, ConfigError) and "run folder" in str(info.value)
    assert not (tmp_path / "out").exists()
