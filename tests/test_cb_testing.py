"""oiafed.testing: the fakes users test their own callbacks with."""

from __future__ import annotations

import asyncio
import doctest

import pytest
import torch

import oiafed.testing
from oiafed import Callback, CallbackError
from oiafed.testing import FakeLearner, FakeTrainer, make_round_result, make_update, run_rounds


def test_module_examples_run():
    assert doctest.testmod(oiafed.testing).failed == 0


def test_fake_trainer_has_what_the_trainer_offers_callbacks(tmp_path):
    trainer = FakeTrainer(run_dir=tmp_path, rounds=7, num_clients=3, lr=0.2)
    assert (trainer.round_num, trainer.rounds, trainer.should_stop) == (0, 7, False)
    assert (trainer.stop_reason, trainer.stopped_by, trainer.client_selection_weights) == (
        None, None, None)
    assert trainer.fit_config == {"lr": 0.2} and trainer.run_dir == tmp_path
    assert trainer.client_ids == ["client_0", "client_1", "client_2"] and trainer.history == []
    trainer.fake_train(3)
    assert all(torch.all(p == 3.0) for p in trainer.model.parameters())


def test_round_results_and_updates():
    update = make_update("client_2", 5, {"accuracy": 0.75, "loss": 0.5})
    result = make_round_result(4, {"accuracy": 0.5}, loss=1.0, updates=[update])
    assert (result.round_num, result.metrics) == (4, {"accuracy": 0.5, "loss": 1.0})
    assert result.updates[0].client_id == "client_2" and result.updates[0].metrics["accuracy"] == 0.75


def test_fake_learner_serves_epoch_hooks():
    seen = []

    class EpochLr(Callback):
        async def on_epoch_start(self, learner, epoch, **kwargs):
            seen.append((learner.client_id, epoch, learner.optimizer.param_groups[0]["lr"]))

    asyncio.run(EpochLr().on_epoch_start(FakeLearner(client_id="client_1", lr=0.3), 2))
    assert seen == [("client_1", 2, 0.3)]


def test_run_rounds_records_the_stopper_and_history():
    class StopAtTwo(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            result.metrics["seen"] = 1.0
            if round_num == 2:
                trainer.should_stop = True

    result = run_rounds([StopAtTwo()], [{"accuracy": 0.1}] * 5)
    assert result.rounds_completed == 2
    assert (result.stopped_by, result.stop_reason) == ("StopAtTwo", "should_stop set by StopAtTwo")
    assert result.history == [{"round": 1, "accuracy": 0.1, "seen": 1.0},
                              {"round": 2, "accuracy": 0.1, "seen": 1.0}]


def test_run_rounds_is_strict_unless_told_otherwise():
    class Broken(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            raise ValueError("bug")

    with pytest.raises(CallbackError, match=r"Broken\.on_round_end"):
        run_rounds([Broken()], [{}])
    lenient = run_rounds([Broken()], [{}, {}], strict=False)
    assert lenient.rounds_completed == 2 and len(lenient.callback_errors) == 2
