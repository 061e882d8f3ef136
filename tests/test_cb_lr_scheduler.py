"""lr_scheduler: argument checks, PyTorch's formulas per round, resume; then through oiafed.run."""

from __future__ import annotations

import asyncio
import bisect
import json
import math

import pytest

import oiafed
from oiafed import Callback, ConfigError, registry
from oiafed.callbacks import LRSchedulerCallback
from oiafed.testing import FakeTrainer, make_round_result, run_rounds
from support import tiny_config


def step(base, n, step_size=10, gamma=0.1):
    return base * gamma ** (n // step_size)


def cosine(base, n, T_max, eta_min=0.0):
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * n / T_max)) / 2


def exponential(base, n, gamma):
    return base * gamma ** n


def multistep(base, n, milestones, gamma=0.1):
    return base * gamma ** bisect.bisect_right(sorted(milestones), n)


# args, the closed form of the rate of round n + 1 (n rounds finished), rounds to check
CASES = {
    "step": ({"step_size": 3, "gamma": 0.5}, lambda b, n: step(b, n, 3, 0.5)),
    "step-defaults": ({}, lambda b, n: step(b, n)),
    "cosine": ({"T_max": 12, "eta_min": 0.001}, lambda b, n: cosine(b, n, 12, 0.001)),
    "exponential": ({"gamma": 0.8}, lambda b, n: exponential(b, n, 0.8)),
    "multistep": ({"milestones": [2, 5, 5, 9], "gamma": 0.3},
                  lambda b, n: multistep(b, n, [2, 5, 5, 9], 0.3)),
}


def yaml_for(case: str) -> dict:
    args, _ = CASES[case]
    return {"type": "lr_scheduler",
            "args": {"scheduler_type": case.split("-")[0], **args}}


class FitConfigWatch(Callback):
    """What the learners would be sent: ``fit_config['lr']`` at the start of each round."""

    def __init__(self) -> None:
        self.sent: list[float] = []

    async def on_round_start(self, trainer, round_num, **kwargs):
        self.sent.append(trainer.fit_config["lr"])


ROUNDS = [{"accuracy": 0.5, "loss": 1.0}] * 12


@pytest.mark.parametrize("case", sorted(CASES))
def test_rates_follow_pytorchs_formula_round_by_round(case):
    _, formula = CASES[case]
    schedule, watch = registry.build("callback", yaml_for(case)), FitConfigWatch()
    trainer = FakeTrainer(lr=0.1, rounds=12)
    result = run_rounds([schedule, watch], ROUNDS, trainer=trainer)
    logged = [row["lr"] for row in result.history]
    assert logged == pytest.approx([formula(0.1, n) for n in range(12)], rel=1e-12, abs=1e-15)
    assert watch.sent == logged  # the rate sent to learners is the rate logged
    assert trainer.fit_config["lr"] == pytest.approx(formula(0.1, 12), rel=1e-12)


def test_cosine_t_max_defaults_to_the_number_of_rounds():
    result = run_rounds([LRSchedulerCallback("cosine")], ROUNDS[:8],
                        trainer=FakeTrainer(lr=0.2, rounds=8))
    assert [row["lr"] for row in result.history] == pytest.approx(
        [cosine(0.2, n, 8) for n in range(8)], rel=1e-12)


def test_plateau_decays_after_patience_evaluated_rounds_without_improvement():
    losses = [1.0, 0.9, 0.95, None, 0.96, 0.97, 0.8, 0.85, 0.86]
    rounds = [{"train_loss": 1.0} if v is None else {"loss": v, "accuracy": 0.5} for v in losses]
    schedule = LRSchedulerCallback("plateau", patience=1, factor=0.5, min_lr=0.03)
    result = run_rounds([schedule], rounds, trainer=FakeTrainer(lr=0.1))
    # Bad evaluated rounds: 3 (1), [4 skipped], 5 (2 > patience: decay), 6 (1), 7 better,
    # 8 (1), 9 (2: decay, floored at min_lr).
    expected = [0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]
    assert [row["lr"] for row in result.history] == pytest.approx(expected)
    assert schedule.lr == pytest.approx(0.03)


def test_plateau_mode_max_on_accuracy():
    rounds = [{"accuracy": a, "loss": 0.0} for a in (0.5, 0.6, 0.6, 0.6)]
    schedule = LRSchedulerCallback("plateau", metric="accuracy", mode="max", patience=0)
    result = run_rounds([schedule], rounds, trainer=FakeTrainer(lr=1.0))
    assert [row["lr"] for row in result.history] == pytest.approx([1.0, 1.0, 1.0, 0.1])


def test_plateau_metric_missing_from_an_evaluated_round_is_reported():
    schedule, trainer = LRSchedulerCallback("plateau", metric="val_loss"), FakeTrainer()
    asyncio.run(schedule.on_train_start(trainer))
    with pytest.raises(ConfigError, match=r"'val_loss'.*accuracy, loss, lr\)"):
        asyncio.run(schedule.on_round_end(trainer, 1, make_round_result(1, accuracy=0.5, loss=1.0)))


@pytest.mark.parametrize("args, words", [
    ({"scheduler_type": "cosin"}, ["scheduler_type", "step, cosine, exponential, multistep, plateau",
                                   "'cosin'", "Did you mean 'cosine'"]),
    ({"scheduler_type": "step", "T_max": 5}, ["T_max", "'step'", "step_size, gamma"]),
    ({"scheduler_type": "cosine", "gamma": 0.5, "factor": 0.1}, ["gamma, factor", "T_max, eta_min"]),
    ({"scheduler_type": "plateau", "step_size": 2}, ["step_size", "metric, mode, factor"]),
    ({"scheduler_type": "exponential"}, ["needs gamma"]),
    ({"scheduler_type": "multistep"}, ["needs milestones"]),
    ({"scheduler_type": "multistep", "milestones": []}, ["milestones", "[]"]),
    ({"scheduler_type": "multistep", "milestones": [3, 0]}, ["milestones", ">= 1", "0"]),
    ({"step_size": 0}, ["step_size", ">= 1", "0"]),
    ({"gamma": 0.0}, ["gamma", "> 0", "0.0"]),
    ({"scheduler_type": "cosine", "T_max": 0}, ["T_max", "0"]),
    ({"scheduler_type": "cosine", "eta_min": -1.0}, ["eta_min", "-1.0"]),
    ({"scheduler_type": "plateau", "factor": 1.0}, ["factor", "< 1", "1.0"]),
    ({"scheduler_type": "plateau", "mode": "down"}, ["mode", "max, min", "'down'"]),
    ({"scheduler_type": "plateau", "patience": -1}, ["patience", "-1"]),
])
def test_bad_arguments_are_config_errors(args, words):
    with pytest.raises(ConfigError) as info:
        LRSchedulerCallback(**args)
    for word in words:
        assert word in str(info.value)


def test_yaml_with_an_argument_of_another_type_fails_with_its_key_path():
    section = {"type": "lr_scheduler", "args": {"scheduler_type": "step", "T_max": 5}}
    with pytest.raises(ConfigError, match=r"callbacks\[2\]\.args: .*T_max does not apply"):
        registry.build("callback", section, "callbacks[2]")


def test_the_seed_config_builds():
    built = registry.build("callback", {"type": "lr_scheduler",
                                        "args": {"scheduler_type": "cosine", "T_max": 100}})
    assert built.options == {"T_max": 100, "eta_min": 0.0}


def test_no_learning_rate_in_fit_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"fit_config\['lr'\]"):
        asyncio.run(LRSchedulerCallback().on_train_start(FakeTrainer(fit_config={})))


ALL = [*sorted(CASES), "plateau"]
PLATEAU_LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.81, 0.82, 0.83, 0.7, 0.71, 0.72, 0.73]


def build(case):
    if case == "plateau":
        return registry.build("callback", {"type": "lr_scheduler", "args": {
            "scheduler_type": "plateau", "patience": 1, "factor": 0.5}})
    return registry.build("callback", yaml_for(case))


def series(case):
    if case == "plateau":
        return [{"loss": v, "accuracy": 0.5} for v in PLATEAU_LOSSES]
    return ROUNDS


@pytest.mark.parametrize("order", ["load before on_train_start", "load after on_train_start"])
@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("cut", [1, 4, 7])
def test_resume_from_state_gives_the_exact_same_rates(case, cut, order):
    whole = run_rounds([build(case)], series(case), trainer=FakeTrainer(lr=0.1, rounds=12))
    expected = [row["lr"] for row in whole.history]

    first = build(case)
    run_rounds([first], series(case)[:cut], trainer=FakeTrainer(lr=0.1, rounds=12))
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # strict JSON
    second = build(case)
    if order == "load before on_train_start":  # as a resumed run: fit_config holds the last rate
        trainer = FakeTrainer(lr=saved["lr"], rounds=12)
        second.load_state_dict(saved)
    else:  # a fresh trainer whose fit_config holds the learner's base rate
        trainer = FakeTrainer(lr=0.1, rounds=12)
        asyncio.run(second.on_train_start(trainer))
        second.load_state_dict(saved)
    resumed = run_rounds([second], series(case)[cut:], trainer=trainer, start_round=cut + 1)
    assert [row["lr"] for row in resumed.history] == expected[cut:]  # exactly equal
    assert second.state_dict() == json.loads(json.dumps(whole_state(case), allow_nan=False))


def whole_state(case):
    schedule = build(case)
    run_rounds([schedule], series(case), trainer=FakeTrainer(lr=0.1, rounds=12))
    return schedule.state_dict()


def test_state_of_another_type_is_refused():
    schedule = LRSchedulerCallback("step")
    run_rounds([schedule], ROUNDS[:2])
    with pytest.raises(ConfigError, match="'step'"):
        LRSchedulerCallback("exponential", gamma=0.9).load_state_dict(schedule.state_dict())


# --- through oiafed.run -------------------------------------------------------------------


class LearnerRates(Callback):
    """The rate each learner's optimizer really had, per round."""

    def __init__(self) -> None:
        self.rates: dict[int, set[float]] = {}

    async def on_epoch_start(self, learner, epoch, **kwargs):
        rate = learner.optimizer.param_groups[0]["lr"]
        self.rates.setdefault(learner.round_num, set()).add(rate)


RUN_CASES = {
    "step": ({"step_size": 2, "gamma": 0.5}, lambda n: step(0.05, n, 2, 0.5)),
    "cosine": ({"T_max": 4, "eta_min": 0.001}, lambda n: cosine(0.05, n, 4, 0.001)),
    "exponential": ({"gamma": 0.8}, lambda n: exponential(0.05, n, 0.8)),
    "multistep": ({"milestones": [2, 4], "gamma": 0.3}, lambda n: multistep(0.05, n, [2, 4], 0.3)),
    # num_clients stays 4, so after the first round it never improves: halve every round.
    "plateau": ({"metric": "num_clients", "mode": "max", "patience": 0, "factor": 0.5},
                lambda n: 0.05 * 0.5 ** max(n - 1, 0)),
}


@pytest.mark.parametrize("kind", sorted(RUN_CASES))
def test_run_logs_the_scheduled_rate_and_learners_train_with_it(tmp_path, kind):
    args, formula = RUN_CASES[kind]
    rates = LearnerRates()
    config = tiny_config(trainer={"args": {"rounds": 5}}, learner={"args": {"lr": 0.05}},
                         callbacks=[{"type": "lr_scheduler",
                                     "args": {"scheduler_type": kind, **args}}])
    result = oiafed.run(config, run_dir=tmp_path / "run", callbacks=[rates])
    assert result.callback_errors == []
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["lr"] for line in lines]
    assert logged == pytest.approx([formula(n) for n in range(5)], rel=1e-12)
    assert {r: sorted(v) for r, v in rates.rates.items()} == {
        r + 1: [rate] for r, rate in enumerate(logged)}
