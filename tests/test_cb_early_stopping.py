"""early_stopping: unit tests on the fakes of ``oiafed.testing``, then through ``oiafed.run``."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

import oiafed
from oiafed import Callback, CallbackError, ConfigError, registry
from oiafed.callbacks import EarlyStoppingCallback
from oiafed.testing import FakeTrainer, make_round_result, run_rounds
from support import tiny_config


def accuracies(*values: float) -> list[dict[str, float]]:
    return [{"accuracy": v, "loss": 1.0 - v} for v in values]


@pytest.mark.parametrize("args, words", [
    ({"mode": "maximum"}, ["mode", "max, min", "'maximum'"]),
    ({"patience": -1}, ["patience", ">= 0", "-1"]),
    ({"patience": 2.5}, ["patience", "2.5"]),
    ({"min_delta": -0.1}, ["min_delta", "-0.1"]),
    ({"min_delta": float("nan")}, ["min_delta", "nan"]),
    ({"metric": ""}, ["metric", "''"]),
    ({"restore_best_weights": "yes"}, ["restore_best_weights", "'yes'"]),
    ({"min_rounds": -2}, ["min_rounds", "-2"]),
])
def test_bad_arguments_are_config_errors_naming_value_and_options(args, words):
    with pytest.raises(ConfigError) as info:
        EarlyStoppingCallback(**args)
    for word in words:
        assert word in str(info.value)


def test_yaml_section_builds_it_and_a_bad_mode_names_the_key_path():
    built = registry.build("callback", {"type": "early_stopping", "args": {"patience": 3}})
    assert isinstance(built, EarlyStoppingCallback) and built.patience == 3
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.args.*'mx'.*Did you mean 'max'"):
        registry.build("callback", {"type": "early_stopping", "args": {"mode": "mx"}},
                       "callbacks[0]")


def test_seed_defaults():
    stopper = EarlyStoppingCallback()
    assert (stopper.patience, stopper.metric, stopper.mode, stopper.min_delta) == (
        10, "accuracy", "max", 0.0)
    assert (stopper.restore_best_weights, stopper.min_rounds) == (False, 0)


def test_stops_once_patience_rounds_in_a_row_do_not_improve():
    result = run_rounds([EarlyStoppingCallback(patience=3)],
                        accuracies(0.5, 0.6, 0.6, 0.59, 0.6, 0.7))
    assert result.rounds_completed == 5
    assert result.stopped_by == "early_stopping"
    assert result.stop_reason == ("early_stopping: accuracy did not improve for 3 rounds "
                                  "(best 0.6 at round 2)")


def test_a_single_hook_call_on_the_fake_trainer():
    trainer, stopper = FakeTrainer(), EarlyStoppingCallback(patience=1)
    asyncio.run(stopper.on_round_end(trainer, 1, make_round_result(1, accuracy=0.5, loss=1.0)))
    assert not trainer.should_stop and stopper.best == 0.5 and stopper.best_round == 1
    asyncio.run(stopper.on_round_end(trainer, 2, make_round_result(2, accuracy=0.5, loss=1.0)))
    assert trainer.should_stop
    assert trainer.stop_reason.startswith("early_stopping: accuracy did not improve for 1 rounds")


def test_improvement_must_exceed_min_delta():
    result = run_rounds([EarlyStoppingCallback(patience=2, min_delta=0.1)],
                        accuracies(0.5, 0.55, 0.6, 0.9))
    assert result.rounds_completed == 3
    assert result.stop_reason.endswith("(best 0.5 at round 1)")


def test_mode_min_watches_loss_going_down():
    rounds = [{"loss": v, "accuracy": 0.0} for v in (1.0, 0.8, 0.9, 0.85, 0.7)]
    result = run_rounds([EarlyStoppingCallback(patience=2, metric="loss", mode="min")], rounds)
    assert result.rounds_completed == 4
    assert result.stop_reason == ("early_stopping: loss did not improve for 2 rounds "
                                  "(best 0.8 at round 2)")


def test_min_rounds_delays_the_stop():
    rounds = accuracies(0.5, 0.4, 0.4, 0.4, 0.4, 0.4)
    assert run_rounds([EarlyStoppingCallback(patience=1)], rounds).rounds_completed == 2
    late = run_rounds([EarlyStoppingCallback(patience=1, min_rounds=4)], rounds)
    assert late.rounds_completed == 4
    assert "did not improve for 3 rounds" in late.stop_reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_metric_stops_at_once(bad):
    result = run_rounds([EarlyStoppingCallback(patience=10, min_rounds=50)],
                        [*accuracies(0.5, 0.6), {"accuracy": bad, "loss": bad}, *accuracies(0.9)])
    assert result.rounds_completed == 3
    assert result.stopped_by == "early_stopping"
    assert result.stop_reason == f"early_stopping: accuracy is {bad} at round 3 (not finite)"


def test_rounds_without_evaluation_are_skipped_not_counted():
    evaluated = {"accuracy": 0.5, "loss": 1.0, "train_loss": 1.0}
    skipped = {"train_loss": 1.0, "train_accuracy": 0.5}
    stopper = EarlyStoppingCallback(patience=2)
    result = run_rounds([stopper], [skipped, evaluated, skipped, evaluated, skipped, evaluated,
                                    skipped, evaluated])
    # Evaluated rounds 2 (best), 4 (counter 1), 6 (counter 2: stop).
    assert result.rounds_completed == 6
    assert result.stop_reason.endswith("for 2 rounds (best 0.5 at round 2)")


def test_a_metric_missing_from_an_evaluated_round_lists_the_metrics_there():
    stopper = EarlyStoppingCallback(metric="val_accuracy")
    result = make_round_result(1, accuracy=0.5, loss=1.0, train_loss=0.9)
    with pytest.raises(ConfigError) as info:
        asyncio.run(stopper.on_round_end(FakeTrainer(), 1, result))
    message = str(info.value)
    assert "'val_accuracy'" in message and "accuracy, loss, train_loss" in message
    assert "Did you mean 'accuracy'" in message


def test_a_metric_that_never_appears_is_an_error_when_training_ends():
    stopper = EarlyStoppingCallback(metric="f1")
    with pytest.raises(CallbackError) as info:
        run_rounds([stopper], [{"train_loss": 1.0}, {"train_loss": 0.9}])
    assert info.value.hook == "on_train_end"
    assert isinstance(info.value.__cause__, ConfigError)
    assert "'f1'" in str(info.value.__cause__) and "train_loss" in str(info.value.__cause__)


def test_restore_best_weights_loads_the_best_round_into_model_and_result():
    trainer = FakeTrainer()
    stopper = EarlyStoppingCallback(patience=2, restore_best_weights=True)
    result = run_rounds([stopper], accuracies(0.5, 0.9, 0.7, 0.6, 0.95), trainer=trainer)
    assert result.rounds_completed == 4  # fake_train left every weight at 4.0
    for tensor in [*result.weights.values(), *trainer.model.state_dict().values()]:
        assert torch.all(tensor == 2.0)


def test_without_restore_the_final_weights_are_the_last_rounds():
    result = run_rounds([EarlyStoppingCallback(patience=2)], accuracies(0.5, 0.9, 0.7, 0.6))
    assert all(torch.all(t == 4.0) for t in result.weights.values())


def test_state_is_json_and_keeps_the_metric_it_watches():
    stopper = EarlyStoppingCallback(patience=5, metric="loss", mode="min")
    run_rounds([stopper], [{"loss": 1.0, "accuracy": 0.1}, {"loss": 1.2, "accuracy": 0.1}])
    state = json.loads(json.dumps(stopper.state_dict(), allow_nan=False))
    assert (state["best"], state["best_round"], state["counter"]) == (1.0, 1, 1)
    with pytest.raises(ConfigError, match="metric"):
        EarlyStoppingCallback(metric="accuracy").load_state_dict(state)


SERIES = accuracies(0.5, 0.6, 0.58, 0.61, 0.61, 0.6, 0.59, 0.7, 0.7, 0.7, 0.7)
YAML = {"type": "early_stopping", "args": {"patience": 3, "min_delta": 0.005, "min_rounds": 2}}


@pytest.mark.parametrize("cut", [1, 3, 5, 6])
def test_resume_from_state_continues_like_an_uninterrupted_run(cut):
    whole = run_rounds([registry.build("callback", YAML)], SERIES)

    first = registry.build("callback", YAML)
    run_rounds([first], SERIES[:cut])
    saved = json.loads(json.dumps(first.state_dict()))
    second = registry.build("callback", YAML)  # rebuilt from its YAML section
    second.load_state_dict(saved)
    resumed = run_rounds([second], SERIES[cut:], start_round=cut + 1)

    assert resumed.rounds_completed == whole.rounds_completed == 7
    assert resumed.stop_reason == whole.stop_reason
    assert resumed.history == whole.history[cut:]


# --- through oiafed.run -------------------------------------------------------------------


class WeightLog(Callback):
    """Keeps a copy of the global weights at the end of every round."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        self.weights[round_num] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_stops_at_the_right_round_and_says_why(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 6}}, callbacks=[
        {"type": "early_stopping", "args": {"patience": 2, "min_delta": 1.0}}])
    result = oiafed.run(config, run_dir=tmp_path / "run", callbacks=None)
    assert result.rounds_completed == 3  # round 1 sets the best; 2 and 3 cannot beat it by 1.0
    assert result.stopped_by == "early_stopping"
    best = result.history[0]["accuracy"]
    assert result.stop_reason == (f"early_stopping: accuracy did not improve for 2 rounds "
                                  f"(best {best:.6g} at round 1)")
    assert [row["round"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == result.stop_reason and summary["stopped_by"] == "early_stopping"


def test_run_with_eval_every_counts_only_evaluated_rounds(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 8, "eval_every": 2}}, callbacks=[
        {"type": "early_stopping", "args": {"patience": 2, "min_delta": 1.0}}])
    result = oiafed.run(config, run_dir=tmp_path / "run")
    assert result.rounds_completed == 6  # evaluated: 2 (best), 4, 6
    assert result.stop_reason.endswith("at round 2)") and result.callback_errors == []


def test_run_restores_the_best_rounds_weights(tmp_path):
    log = WeightLog()
    # Accuracy rises on this config, so with mode=min round 1 stays the best.
    config = tiny_config(trainer={"args": {"rounds": 6}}, callbacks=[
        {"type": "early_stopping",
         "args": {"patience": 2, "mode": "min", "restore_best_weights": True}}])
    result = oiafed.run(config, run_dir=tmp_path / "run", callbacks=[log])
    assert result.rounds_completed == 3
    assert result.history[0]["accuracy"] < result.history[2]["accuracy"]
    assert set(result.weights) == set(log.weights[1])
    for name, tensor in result.weights.items():
        assert torch.equal(tensor, log.weights[1][name])
    assert any(not torch.equal(log.weights[1][k], log.weights[3][k]) for k in log.weights[1])


def test_run_with_a_misspelt_metric_records_an_error_that_names_the_metrics(tmp_path):
    config = tiny_config(callbacks=[{"type": "early_stopping", "args": {"metric": "acuracy"}}])
    result = oiafed.run(config, run_dir=tmp_path / "run")
    assert result.rounds_completed == 3 and result.stop_reason == "completed"
    errors = {(e["hook"], e["callback"]) for e in result.callback_errors}
    assert ("on_round_end", "early_stopping") in errors
    assert "Did you mean 'accuracy'" in result.callback_errors[0]["error"]
    assert not math.isnan(result.history[-1]["accuracy"])
