"""Every stateful built-in callback through a real interrupted and resumed run (``--resume``)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import oiafed
from oiafed.state import load_state
from support import Interrupt, tiny_config, without_timing

CALLBACKS = [
    {"type": "lr_scheduler", "args": {"scheduler_type": "step", "step_size": 2, "gamma": 0.5}},
    # Accuracy rises on this config, so with mode=min round 1 stays best: stops at round 5.
    # restore_best_weights: the resumed run must end with round 1's weights, kept in the state.
    {"type": "early_stopping", "args": {"patience": 4, "mode": "min", "restore_best_weights": True}},
    {"type": "model_checkpoint", "args": {"save_every": 2, "keep_last": 1}},
    {"type": "tensorboard"},
    {"type": "csv_logger"},
]
CONFIG = tiny_config(trainer={"args": {"rounds": 6}}, callbacks=CALLBACKS,
                     runtime={"checkpoint_interval": 0})  # a state after every round


def csv_rows(folder):
    with open(folder / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "round_time"} for row in csv.DictReader(handle)]


def scalars(folder):
    events = EventAccumulator(str(folder / "runs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag != "round_time"}


def checkpoints(folder):
    found = {}
    for path in sorted((folder / "checkpoints").iterdir()):
        saved = torch.load(path, weights_only=True)
        found[path.name] = (saved["round"], saved["weights"],
                            {k: v for k, v in saved["metrics"].items() if k != "round_time"})
    return found


@pytest.mark.parametrize("cut", [2, 4])
def test_resumed_run_matches_the_uninterrupted_one_in_every_output(
        tmp_path, cut, event_files_in_creation_order):
    whole = oiafed.run(CONFIG, run_dir=tmp_path / "whole")
    assert whole.rounds_completed == 5 and whole.stopped_by == "early_stopping"
    assert [row["lr"] for row in whole.history] == [0.05, 0.05, 0.025, 0.025, 0.0125]

    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=tmp_path / "cut", callbacks=[Interrupt(cut)])
    resumed = oiafed.run(None, resume=tmp_path / "cut")

    assert resumed.callback_errors == []
    assert (resumed.rounds_completed, resumed.stop_reason, resumed.stopped_by) == (
        whole.rounds_completed, whole.stop_reason, whole.stopped_by)
    assert without_timing(resumed.history) == without_timing(whole.history)  # lr included
    for key, tensor in whole.weights.items():
        assert torch.equal(resumed.weights[key], tensor)
    assert csv_rows(tmp_path / "cut") == csv_rows(tmp_path / "whole")
    assert scalars(tmp_path / "cut") == scalars(tmp_path / "whole")
    ours, theirs = checkpoints(tmp_path / "cut"), checkpoints(tmp_path / "whole")
    assert sorted(ours) == sorted(theirs) == ["best.pt", "last.pt", "round_0004.pt"]
    for name, (round_num, weights, metrics) in theirs.items():
        assert ours[name][0] == round_num and ours[name][2] == metrics
        assert all(torch.equal(ours[name][1][k], w) for k, w in weights.items())
    state = load_state(tmp_path / "cut")["trainer"]["callbacks"]
    assert sorted(state) == ["csv_logger", "early_stopping", "lr_scheduler", "model_checkpoint",
                             "tensorboard"]
    assert set(state["early_stopping"].pop("best_weights")) == set(whole.weights)
    json.dumps(state, allow_nan=False)  # the rest of the callback state is plain JSON
