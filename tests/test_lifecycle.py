"""The round loop of SPEC §1: hook order, errors, stopping, selection, determinism."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

import oiafed
from oiafed import Callback, CallbackError, CallbackManager
from oiafed.core.trainer import SelectionError
from support import Recorder, tiny_config, without_timing


def test_golden_hook_order_over_two_rounds(tmp_path):
    recorder = Recorder()
    config = tiny_config(data={"type": "digits", "num_clients": 2},
                         trainer={"args": {"rounds": 2}},
                         learner={"args": {"epochs": 2, "lr": 0.05}})
    result = oiafed.run(config, run_dir=tmp_path / "run", callbacks=[recorder])

    params = ["1.bias", "1.weight"]
    metric_keys = ["accuracy", "loss"]
    expected = [("on_train_start",)]
    for round_num in (1, 2):
        expected.append(("on_round_start", round_num))
        for client in ("client_0", "client_1"):
            for epoch in (1, 2):
                expected.append(("on_epoch_start", client, epoch))
                expected.append(("on_epoch_end", client, epoch, metric_keys))
        expected += [
            ("on_aggregate_start", ["client_0", "client_1"]),
            ("on_aggregate_end", params),
            ("on_round_end", round_num, round_num),
        ]
    expected.append(("on_train_end", 2))
    assert recorder.trace == expected
    assert result.rounds_completed == 2
    assert [row["round"] for row in result.history] == [1, 2]


def test_round_result_carries_the_documented_metrics(tmp_path):
    seen = []

    class Grab(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            seen.append(result)

    oiafed.run(tiny_config(trainer={"args": {"rounds": 2, "clients_per_round": 3}}),
               run_dir=tmp_path / "run", callbacks=[Grab()])
    result = seen[-1]
    assert {"accuracy", "loss", "train_accuracy", "train_loss", "num_clients", "num_samples",
            "round_time"} <= set(result.metrics)
    assert result.metrics["num_clients"] == 3 == len(result.updates)
    assert result.metrics["num_samples"] == sum(u.num_samples for u in result.updates)
    weighted = sum(u.metrics["loss"] * u.num_samples for u in result.updates)
    assert result.metrics["train_loss"] == pytest.approx(weighted / result.metrics["num_samples"])
    for update in result.updates:
        assert update.client_id.startswith("client_")
        assert {"accuracy", "loss"} <= set(update.metrics)
        assert set(update.weights) == {"1.weight", "1.bias"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


def test_training_improves_the_global_model(tmp_path):
    result = oiafed.run(tiny_config(trainer={"args": {"rounds": 5}}), run_dir=tmp_path / "r")
    assert result.history[-1]["accuracy"] > result.history[0]["accuracy"]
    assert result.history[-1]["accuracy"] > 0.7


def test_plain_def_hooks_and_kwargs_work(tmp_path):
    calls = []

    class Sync(Callback):
        def on_round_end(self, trainer, round_num, result, **kwargs):
            calls.append(round_num)

    oiafed.run(tiny_config(), run_dir=tmp_path / "run", callbacks=[Sync()])
    assert calls == [1, 2, 3]


class Boom(Callback):
    async def on_round_end(self, trainer, round_num, result, **kwargs):
        raise RuntimeError(f"boom in round {round_num}")


class Counter(Callback):
    def __init__(self) -> None:
        self.rounds = 0

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        self.rounds += 1


def test_a_failing_callback_is_logged_counted_and_training_goes_on(tmp_path, caplog):
    counter = Counter()
    with caplog.at_level(logging.ERROR, logger="oiafed"):
        result = oiafed.run(tiny_config(), run_dir=tmp_path / "run", callbacks=[Boom(), counter])
    assert result.rounds_completed == 3
    assert counter.rounds == 3  # callbacks after the failing one still ran
    assert [e["round"] for e in result.callback_errors] == [1, 2, 3]
    assert result.callback_errors[0]["callback"] == "Boom"
    assert result.callback_errors[0]["hook"] == "on_round_end"
    assert "boom in round 1" in result.callback_errors[0]["error"]
    failures = [r for r in caplog.records if "Boom.on_round_end" in r.getMessage()]
    assert len(failures) == 3 and failures[0].exc_info is not None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["callback_errors"] == {"total": 3, "by_callback": {"Boom.on_round_end": 3}}


def test_strict_mode_reraises(tmp_path):
    config = tiny_config(strict=True)
    with pytest.raises(CallbackError, match=r"Boom\.on_round_end"):
        oiafed.run(config, run_dir=tmp_path / "run", callbacks=[Boom()])


def test_callback_manager_runs_in_list_order():
    order = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        async def on_round_start(self, trainer, round_num, **kwargs):
            order.append(self.name)

    manager = CallbackManager([Named("a"), Named("b"), Named("c")])
    asyncio.run(manager.on_round_start(object(), 1))
    assert order == ["a", "b", "c"]
    assert not manager.implements("on_epoch_end")


def test_should_stop_ends_after_the_current_round_and_names_the_callback(tmp_path):
    ends = []

    class StopAtTwo(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            if round_num == 2:
                trainer.should_stop = True

    class End(Callback):
        async def on_train_end(self, trainer, result, **kwargs):
            ends.append(result)

    result = oiafed.run(tiny_config(trainer={"args": {"rounds": 10}}), run_dir=tmp_path / "run",
                        callbacks=[StopAtTwo(), End()])
    assert result.rounds_completed == 2
    assert result.stopped_by == "StopAtTwo"
    assert "StopAtTwo" in result.stop_reason
    assert len(ends) == 1 and ends[0].rounds_completed == 2


def test_completed_run_has_no_stopper(tmp_path):
    result = oiafed.run(tiny_config(), run_dir=tmp_path / "run")
    assert result.stop_reason == "completed" and result.stopped_by is None


class PickOnly(Callback):
    """Restricts the next selection to ``allowed`` in the rounds listed."""

    def __init__(self, allowed, rounds):
        self.allowed, self.rounds, self.selected = allowed, rounds, {}

    async def on_round_start(self, trainer, round_num, **kwargs):
        if round_num in self.rounds:
            trainer.client_selection_weights = {cid: 1.0 for cid in self.allowed}

    async def on_aggregate_start(self, trainer, updates, **kwargs):
        self.selected[trainer.round_num] = sorted(u.client_id for u in updates)


def test_selection_weights_restrict_sampling_and_are_cleared(tmp_path):
    picker = PickOnly(["client_1", "client_5", "client_7"], rounds={1, 2, 3})
    config = tiny_config(data={"type": "digits", "num_clients": 8},
                         trainer={"args": {"rounds": 6, "clients_per_round": 2}})
    oiafed.run(config, run_dir=tmp_path / "run", callbacks=[picker])
    for round_num in (1, 2, 3):
        assert len(picker.selected[round_num]) == 2
        assert set(picker.selected[round_num]) <= {"client_1", "client_5", "client_7"}
    later = set().union(*(picker.selected[r] for r in (4, 5, 6)))
    assert later - {"client_1", "client_5", "client_7"}, "weights must be cleared after use"


def test_selection_weight_zero_excludes_and_bad_weights_fail(tmp_path):
    class Weights(Callback):
        def __init__(self, weights):
            self.weights = weights

        async def on_round_start(self, trainer, round_num, **kwargs):
            trainer.client_selection_weights = self.weights

    config = tiny_config(trainer={"args": {"rounds": 1, "clients_per_round": 4}})
    seen = Recorder()
    oiafed.run(config, run_dir=tmp_path / "a",
               callbacks=[Weights({"client_0": 1, "client_2": 3, "client_3": 0}), seen])
    assert ("on_aggregate_start", ["client_0", "client_2"]) in seen.trace
    with pytest.raises(SelectionError, match="unknown client 'nobody'"):
        oiafed.run(config, run_dir=tmp_path / "b", callbacks=[Weights({"nobody": 1.0})])
    with pytest.raises(SelectionError, match="finite number >= 0"):
        oiafed.run(config, run_dir=tmp_path / "c", callbacks=[Weights({"client_0": -1})])


def test_callbacks_can_read_and_change_trainer_and_learner(tmp_path):
    seen = {}

    class Inspect(Callback):
        async def on_train_start(self, trainer, **kwargs):
            seen["client_ids"] = list(trainer.client_ids)
            seen["config_name"] = trainer.config.name
            seen["model"] = trainer.model

        async def on_epoch_start(self, learner, epoch, **kwargs):
            for group in learner.optimizer.param_groups:
                group["lr"] = 0.0  # freeze local training
            seen.setdefault("learners", set()).add(learner.client_id)
            assert learner.model is not None

    result = oiafed.run(tiny_config(trainer={"args": {"rounds": 2}}), run_dir=tmp_path / "run",
                        callbacks=[Inspect()])
    assert seen["client_ids"] == ["client_0", "client_1", "client_2", "client_3"]
    assert seen["config_name"] == "tiny"
    assert seen["learners"] == set(seen["client_ids"])
    # lr 0 everywhere: the global model never moves from its initialisation
    fresh = oiafed.run(tiny_config(trainer={"args": {"rounds": 1}}), run_dir=tmp_path / "fresh",
                       callbacks=[Inspect()])
    for key, value in result.weights.items():
        assert torch.equal(value, fresh.weights[key])


def test_same_config_and_seed_give_identical_history(tmp_path):
    config = tiny_config(data={"type": "digits", "num_clients": 6,
                               "partition": {"type": "dirichlet", "args": {"alpha": 0.5,
                                                                          "min_size": 5}}},
                         trainer={"args": {"rounds": 3, "clients_per_round": 3}})
    first = oiafed.run(config, run_dir=tmp_path / "a")
    second = oiafed.run(config, run_dir=tmp_path / "b")
    other = oiafed.run(config, run_dir=tmp_path / "c", overrides=["seed=1"])
    assert without_timing(first.history) == without_timing(second.history)
    for key in first.weights:
        assert torch.equal(first.weights[key], second.weights[key])
    assert without_timing(first.history) != without_timing(other.history)


def test_eval_every_skips_global_evaluation(tmp_path):
    result = oiafed.run(tiny_config(trainer={"args": {"rounds": 5, "eval_every": 2}}),
                        run_dir=tmp_path / "run")
    evaluated = [row["round"] for row in result.history if "accuracy" in row]
    assert evaluated == [2, 4, 5]
    assert all("train_accuracy" in row for row in result.history)


def test_fraction_samples_that_share_of_clients(tmp_path):
    seen = Recorder()
    config = tiny_config(data={"type": "digits", "num_clients": 10},
                         trainer={"args": {"rounds": 2, "fraction": 0.3}})
    result = oiafed.run(config, run_dir=tmp_path / "run", callbacks=[seen])
    assert [row["num_clients"] for row in result.history] == [3, 3]


def test_bad_updates_are_rejected_logged_and_left_out(tmp_path, caplog, clean_registry):
    from oiafed import Learner, register

    @register("learner.poisoned")
    class Poisoned(Learner):
        async def fit(self, client_id, weights, data, **kwargs):
            update = await super().fit(client_id, weights, data, **kwargs)
            if client_id == "client_1":
                update.weights = {k: torch.full_like(v, float("nan"))
                                  for k, v in update.weights.items()}
            if client_id == "client_2":
                update.weights["extra"] = torch.zeros(1)
            return update

    config = tiny_config(learner={"type": "poisoned", "args": {"lr": 0.05}})
    with caplog.at_level(logging.WARNING, logger="oiafed"):
        result = oiafed.run(config, run_dir=tmp_path / "run")
    assert [row["num_clients"] for row in result.history] == [2, 2, 2]
    assert all(torch.isfinite(v).all() for v in result.weights.values())
    messages = [r.getMessage() for r in caplog.records]
    assert any("client_1: 1.bias holds non-finite values" in m or
               ("client_1" in m and "non-finite" in m) for m in messages)
    assert any("client_2" in m and "unknown keys ['extra']" in m for m in messages)


def test_a_round_without_any_usable_update_fails_clearly(tmp_path, clean_registry):
    from oiafed import Learner, OiafedError, register

    @register("learner.all_nan")
    class AllNan(Learner):
        async def fit(self, client_id, weights, data, **kwargs):
            update = await super().fit(client_id, weights, data, **kwargs)
            update.weights = {k: v * float("inf") for k, v in update.weights.items()}
            return update

    with pytest.raises(OiafedError, match="round 1: 0 usable client update"):
        oiafed.run(tiny_config(learner={"type": "all_nan"}), run_dir=tmp_path / "run")
