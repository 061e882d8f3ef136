"""``oiafed.load_model``: a run's model rebuilt from its folder, with its final, last saved or
best weights (safetensors / ``weights_only``, never unpickled), or a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import oiafed
from oiafed.exceptions import InputError
from support import Interrupt, tiny_config

CONFIG = tiny_config(trainer={"args": {"rounds": 4}}, model={"type": "mlp", "args": {"hidden": [8]}},
                     callbacks=[{"type": "model_checkpoint", "args": {"save_every": 0}}])


def assert_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def test_final_last_and_best_weights_of_a_finished_run(tmp_path):
    result = oiafed.run(CONFIG, run_dir=tmp_path / "run")
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert partition["model_input"] == {"input_shape": [1, 8, 8], "num_classes": 10}

    final = oiafed.load_model(tmp_path / "run")  # "final" by default
    assert isinstance(final, nn.Module) and not final.training
    assert_weights(final, result.weights)
    assert_weights(oiafed.load_model(tmp_path / "run", which="last"), result.weights)

    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["round"] == result.best()["round"]
    assert_weights(oiafed.load_model(tmp_path / "run", which="best"), best["weights"])

    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert final(x).shape == (5, 10)


def test_an_unfinished_run_has_last_weights_but_no_final_ones(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        oiafed.run({**CONFIG, "runtime": {"checkpoint_interval": 0}}, run_dir=tmp_path / "cut",
                   callbacks=[Interrupt(3)], overrides=["callbacks.0.args.save_every=1"])
    with pytest.raises(InputError, match="has not finished: its state holds round 2 of 4"):
        oiafed.load_model(tmp_path / "cut", which="final")
    model = oiafed.load_model(tmp_path / "cut", which="last")
    round_2 = torch.load(tmp_path / "cut" / "checkpoints" / "round_0002.pt", weights_only=True)
    assert round_2["round"] == 2
    assert_weights(model, round_2["weights"])


def test_missing_weights_are_a_clear_error(tmp_path):
    oiafed.run({**CONFIG, "callbacks": [], "runtime": {"checkpoint_every": 0}},
               run_dir=tmp_path / "run")
    with pytest.raises(InputError, match=r"checkpoints/best\.pt does not exist.*model_checkpoint"):
        oiafed.load_model(tmp_path / "run", which="best")
    with pytest.raises(InputError, match=r"state\.safetensors does not exist.*checkpoint_every"):
        oiafed.load_model(tmp_path / "run", which="last")
    with pytest.raises(InputError, match="which must be one of best, last, final"):
        oiafed.load_model(tmp_path / "run", which="latest")
    with pytest.raises(InputError, match="is not a run folder"):
        oiafed.load_model(tmp_path)


def test_a_pickled_best_checkpoint_is_refused_not_run(tmp_path):
    oiafed.run(CONFIG, run_dir=tmp_path / "run")

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"weights": Payload()}, tmp_path / "run" / "checkpoints" / "best.pt")
    with pytest.raises(InputError, match="not a checkpoint of weights"):
        oiafed.load_model(tmp_path / "run", which="best")


def test_a_run_folder_without_model_input_rebuilds_it_from_the_config(tmp_path):
    result = oiafed.run(CONFIG, run_dir=tmp_path / "run")
    (tmp_path / "run" / "partition.json").unlink()  # as written before it recorded model_input
    assert_weights(oiafed.load_model(tmp_path / "run"), result.weights)
