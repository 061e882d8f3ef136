"""Exact resume: a run stopped at any point continues to the uninterrupted run's result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import oiafed
from oiafed.exceptions import InputError
from oiafed.state import STATE_FILE, StateWriter, load_state
from support import Interrupt, assert_same_weights, kill_and_resume, tiny_config, without_timing

CONFIG = tiny_config(
    data={"type": "digits", "num_clients": 6,
          "partition": {"type": "dirichlet", "args": {"alpha": 0.5, "min_size": 5}}},
    trainer={"args": {"rounds": 6, "clients_per_round": 3}},
    runtime={"checkpoint_interval": 0},  # a state after every round, however fast
)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def rounds_in(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]




def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole = oiafed.run(CONFIG, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=tmp_path / "cut", callbacks=[Interrupt(3)])
    assert rounds_in(tmp_path / "cut") == [1, 2]  # killed inside round 3

    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert resumed.rounds_completed == 6
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert_same_weights(resumed.weights, whole.weights)
    assert rounds_in(tmp_path / "cut") == [1, 2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["rounds_completed"] == 6


def test_rounds_after_the_last_saved_state_are_redone_once(tmp_path):
    config = {**CONFIG, "runtime": {"checkpoint_every": 2, "checkpoint_interval": 0}}
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(4)])
    assert rounds_in(tmp_path / "cut") == [1, 2, 3]  # state saved after round 2 only
    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert rounds_in(tmp_path / "cut") == [1, 2, 3, 4, 5, 6]
    assert without_timing(resumed.history) == without_timing(whole.history)


def test_checkpoint_interval_spaces_the_saves_out_but_always_saves_the_end(tmp_path, monkeypatch):
    config = {**CONFIG, "runtime": {"checkpoint_interval": 3600}}
    written = []
    submit = StateWriter.submit_snapshot
    monkeypatch.setattr(StateWriter, "submit_snapshot",
                        lambda self, snap: (written.append(snap), submit(self, snap))[1])
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    assert len(written) == 2  # after the first round and after the last, none within the hour
    assert load_state(tmp_path / "whole")["trainer"]["round_num"] == 6  # the last round
    assert_same_weights(load_state(tmp_path / "whole")["trainer"]["weights"], whole.weights)


def test_a_failed_run_leaves_the_state_of_its_last_completed_round(tmp_path):
    config = {**CONFIG, "runtime": {"checkpoint_interval": 3600}}
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(4)])
    assert load_state(tmp_path / "cut")["trainer"]["round_num"] == 3  # round 4 never ended
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["rounds_completed"] == 3
    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert_same_weights(resumed.weights, whole.weights)


def test_resuming_a_finished_run_changes_nothing_in_the_result(tmp_path):
    whole = oiafed.run(CONFIG, run_dir=tmp_path / "run")
    again = oiafed.run(None, resume=tmp_path / "run")
    assert again.rounds_completed == 6
    assert without_timing(again.history) == without_timing(whole.history)
    assert rounds_in(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_a_broken_state_file_is_a_clear_error_that_changes_nothing(tmp_path, damage):
    # Stopped in round 3: the state was saved after round 2, so a missing one is lost (a run
    # stopped before its first save has none yet and starts again: test_run_records.py).
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=tmp_path / "run", callbacks=[Interrupt(3)])
    state = tmp_path / "run" / STATE_FILE
    if damage == "corrupt":
        state.write_bytes(b"not a checkpoint at all")
    elif damage == "missing":
        state.unlink()
    else:
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    before = folder_digest(tmp_path / "run")
    with pytest.raises(InputError, match="cannot resume"):
        oiafed.run(None, resume=tmp_path / "run")
    assert folder_digest(tmp_path / "run") == before


def test_resume_rejects_a_different_config_and_a_non_run_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=tmp_path / "run", callbacks=[Interrupt(2)])
    before = folder_digest(tmp_path / "run")
    with pytest.raises(InputError, match="differs"):
        oiafed.run({**CONFIG, "seed": 7}, resume=tmp_path / "run")
    with pytest.raises(InputError, match="not a run folder"):
        oiafed.run(None, resume=tmp_path)
    assert folder_digest(tmp_path / "run") == before


def test_state_file_is_safetensors_with_json_metadata(tmp_path):
    from safetensors.torch import load_file

    result = oiafed.run(CONFIG, run_dir=tmp_path / "run")
    raw = load_file(tmp_path / "run" / STATE_FILE)  # plain safetensors: nothing to unpickle
    assert sum(t.numel() for t in raw.values()) >= sum(t.numel() for t in result.weights.values())
    state = load_state(tmp_path / "run")
    assert state["trainer"]["round_num"] == 6
    assert_same_weights(state["trainer"]["weights"], result.weights)
    assert state["trainer"]["history"] is None  # kept in metrics.jsonl, not re-saved per round


def test_checkpoint_every_zero_writes_no_state(tmp_path):
    oiafed.run({**CONFIG, "runtime": {"checkpoint_every": 0}}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / STATE_FILE).exists()
    with pytest.raises(InputError, match="does not exist"):
        oiafed.run(None, resume=tmp_path / "run")


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_uninterrupted_result(tmp_path):
    config = {**CONFIG, "trainer": {"args": {"rounds": 8, "clients_per_round": 3}}}
    rows, whole = kill_and_resume(tmp_path, config)
    assert [row["round"] for row in rows] == list(range(1, 9))
    assert without_timing(rows) == without_timing(whole.history)
    run_dir = tmp_path / "killed"
    final = load_state(run_dir)["trainer"]["weights"]
    assert_same_weights(final, whole.weights)


def test_resume_needs_the_saved_rounds_in_metrics_jsonl(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=tmp_path / "run", callbacks=[Interrupt(4)])
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[2]]) + "\n")  # round 2 lost
    before = folder_digest(tmp_path / "run")
    with pytest.raises(InputError, match=r"does not hold rounds 1\.\.3"):
        oiafed.run(None, resume=tmp_path / "run")
    assert folder_digest(tmp_path / "run") == before
