"""A client cannot take the global model over through what its update declares (issue 14,
item 3): its sample count is checked against what the server knows, an update absurdly far
from the round's global model is left out, and a global model that is not finite is never
loaded: the round fails and the run folder keeps the last good round, which resumes."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import oiafed
from oiafed import Callback
from oiafed.callbacks.base import CallbackManager
from oiafed.config import DataConfig
from oiafed.core.aggregators import FedAvg
from oiafed.core.trainer import Trainer
from oiafed.core.types import ClientTask, ClientUpdate, Outcome, RoundTask
from oiafed.data.federated import build_federated_data
from oiafed.data.leaf import LeafSynthetic
from oiafed.exceptions import ConfigError, RoundFailed
from oiafed.run import run_coroutine
from oiafed.runtime.base import Runtime
from oiafed.state import load_state
from support import tiny_config

HOSTILE = '''
import torch
from oiafed.core.learner import Learner
from oiafed.registry import register

ACTIVE = True  # a test turns the lie off before it resumes a run


@register("learner.hostile")
class Hostile(Learner):
    """The default learner, except that client ``victim`` lies from round ``from_round`` on:
    it declares ``num_samples``, sends its floating-point weights times ``scale`` or all
    equal to ``fill``."""

    def __init__(self, victim="client_2", num_samples=None, scale=None, fill=None,
                 from_round=1, **kwargs):
        super().__init__(**kwargs)
        self.victim, self.num_samples, self.scale, self.fill = victim, num_samples, scale, fill
        self.from_round = from_round

    async def fit(self, client_id, weights, data, **kwargs):
        update = await super().fit(client_id, weights, data, **kwargs)
        if ACTIVE and client_id == self.victim and kwargs["round_num"] >= self.from_round:
            if self.num_samples is not None:
                update.num_samples = self.num_samples
            if self.scale is not None:
                update.weights = {k: v * self.scale if v.is_floating_point() else v
                                  for k, v in update.weights.items()}
            if self.fill is not None:
                update.weights = {k: torch.full_like(v, self.fill) if v.is_floating_point()
                                  else v for k, v in update.weights.items()}
        return update
'''


@pytest.fixture
def hostile(user_module: Callable[[str, str], Path]) -> str:
    """The ``hostile`` learner's module, importable (``imports: [hostile]``)."""
    user_module("hostile", HOSTILE)
    return "hostile"


def hostile_config(tmp_path: Path, rounds: int = 2, trainer: dict[str, Any] | None = None,
                   **lie: Any) -> dict[str, Any]:
    return tiny_config(imports=["hostile"], output_dir=str(tmp_path),
                       trainer={"args": {"rounds": rounds, **(trainer or {})}},
                       learner={"type": "hostile", "args": {"lr": 0.05, "batch_size": 32, **lie}})


def client_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]


def errors(run_dir: Path) -> dict[tuple[int, str], str]:
    return {(r["round"], r["client_id"]): r["error"] for r in client_rows(run_dir) if "error" in r}


# -- in a real run (serial) -----------------------------------------------------------------------


def test_a_client_declaring_more_samples_than_it_has_is_left_out(tmp_path, hostile):
    """A huge count made the global model the liar's: its negated weights scored 0.02-0.14."""
    result = oiafed.run(hostile_config(tmp_path, num_samples=10**12, scale=-1.0))
    size = json.loads((result.run_dir / "partition.json").read_text())[
        "clients"]["client_2"]["num_samples"]
    reason = f"num_samples {10**12} is more than the {size} training samples it has"
    assert errors(result.run_dir) == {(1, "client_2"): reason, (2, "client_2"): reason}
    assert [row["num_clients"] for row in result.history] == [3, 3]
    assert result.history[-1]["accuracy"] > 0.4


def test_an_update_absurdly_far_from_the_global_model_is_left_out(tmp_path, hostile):
    """Weights of 3e38 made the next round's training NaN: every update was then rejected."""
    result = oiafed.run(hostile_config(tmp_path, rounds=3, fill=3e38))
    found = errors(result.run_dir)
    assert sorted(found) == [(1, "client_2"), (2, "client_2"), (3, "client_2")]
    assert all("more than max_update_norm_ratio=1000 times the round's median distance" in e
               for e in found.values())
    assert [row["num_clients"] for row in result.history] == [3, 3, 3]
    assert all(math.isfinite(row["accuracy"]) for row in result.history)


def test_a_global_model_that_is_not_finite_fails_the_round_and_the_last_good_one_resumes(
        tmp_path, hostile):
    """With the bound off, weights of 3.4e38 in round 2, amplified by the server's learning
    rate, overflow: the round fails, the model is not loaded, the state on disk is round 1's,
    and it resumes exactly."""
    config = {**hostile_config(tmp_path, rounds=3, trainer={"max_update_norm_ratio": None},
                               fill=3.4e38, from_round=2),
              "aggregator": {"type": "fedavgm", "args": {"server_lr": 5.0}}}
    with pytest.raises(RoundFailed, match="round 2: the aggregated global model is not finite"):
        oiafed.run(config, run_dir=tmp_path / "attacked")
    run_dir = tmp_path / "attacked"
    state = load_state(run_dir)["trainer"]
    assert state["round_num"] == 1
    assert all(bool(torch.isfinite(w).all()) for w in state["weights"].values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert "not finite" in summary["stop_reason"]

    sys.modules["hostile"].ACTIVE = False  # the attacker is gone
    resumed = oiafed.run(None, resume=run_dir)
    honest = oiafed.run(config, run_dir=tmp_path / "honest")
    assert resumed.rounds_completed == 3
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in honest.history]
    assert all(torch.equal(resumed.weights[k], honest.weights[k]) for k in honest.weights)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lying_client_is_left_out_over_grpc_loopback(tmp_path, hostile):
    """The same checks where clients are processes that send their updates over the wire."""
    config = hostile_config(tmp_path, num_samples=10**12, scale=-1.0)
    result = oiafed.run({**config, "runtime": {"mode": "grpc"}})
    assert sorted(errors(result.run_dir)) == [(1, "client_2"), (2, "client_2")]
    assert all(e.startswith(f"num_samples {10**12} is more than the ")
               for e in errors(result.run_dir).values())
    assert [row["num_clients"] for row in result.history] == [3, 3]


def test_the_bound_is_a_ratio_of_at_least_1():
    with pytest.raises(ConfigError, match=r"trainer\.args\.max_update_norm_ratio: must be >= 1"):
        oiafed.validate(tiny_config(trainer={"args": {"max_update_norm_ratio": 0.5}}))


def test_the_sizes_the_server_checks_against_are_the_clients_data():
    """``client_size`` is what an honest learner declares (``len`` of its data); LEAF's
    comes from the client's first random draw, generating nothing."""
    leaf = LeafSynthetic(0, 40, size_lognormal=[4.0, 2.0], max_samples_per_client=3000,
                         test_clients=2, cache_clients=0)
    before = leaf.generated
    sizes = [leaf.client_size(cid) for cid in leaf.client_ids]
    assert leaf.generated == before
    assert sizes == [len(leaf.client_data(cid)) for cid in leaf.client_ids]
    assert len(set(sizes)) > 10
    pool = build_federated_data(DataConfig.model_validate(
        {"num_clients": 7, "partition": {"type": "dirichlet", "args": {"alpha": 0.3}}}), 3)
    assert [pool.client_size(c) for c in pool.client_ids] == [
        len(pool.client_data(c)) for c in pool.client_ids]


# -- the trainer's checks, with scripted clients ----------------------------------------------------


Script = Callable[[int, str, dict[str, torch.Tensor]], tuple[int, dict[str, torch.Tensor]]]


class Scripted(Runtime):
    """Each client answers ``script(round, client_id, global weights)``: its declared
    ``num_samples`` and weights."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        updates: list[Outcome] = []
        for client in clients:
            count, weights = self.script(task.round_num, client.client_id, task.weights)
            updates.append(ClientUpdate(client.client_id, count, {}, weights))
        return updates


class Failures(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str]] = []

    async def on_client_failure(self, trainer, client_id, error, **kwargs):
        self.seen.append((trainer.round_num, client_id, error))


def scripted_run(script: Script, rounds: int, clients: int = 2,
                 client_size: Callable[[str], int] | None = None,
                 **trainer_args: Any) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
    failures = Failures()
    trainer = Trainer(rounds=rounds, **trainer_args).bind(
        model=nn.Linear(2, 2), aggregator=FedAvg(), runtime=Scripted(script),
        callbacks=CallbackManager([failures]), test_data=None,
        client_ids=[f"client_{i}" for i in range(clients)], seed=0, client_size=client_size)
    result = run_coroutine(trainer.fit())
    return result.history, failures.seen


def moved(weights: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by for k, v in weights.items()}


def test_where_the_server_knows_each_clients_size_it_never_believes_more():
    sizes = {"client_0": 10, "client_1": 20}
    declared = {1: {"client_0": 11, "client_1": 20}, 2: {"client_0": 3, "client_1": 20}}
    history, failures = scripted_run(
        lambda r, cid, w: (declared[r][cid], moved(w, 0.01)), rounds=2, client_size=sizes.get)
    assert failures == [(1, "client_0", "num_samples 11 is more than the 10 training samples "
                                        "it has")]
    assert [row["num_samples"] for row in history] == [20, 23]  # fewer is the client's loss


def test_in_a_deployment_a_client_never_declares_more_than_in_its_first_accepted_update():
    """Nor more than 2**53 (10**400 crashed the aggregation: no float holds it)."""
    declared = {1: {"client_0": 10**400, "client_1": 20}, 2: {"client_0": 10, "client_1": 20},
                3: {"client_0": 10**9, "client_1": 20}, 4: {"client_0": 5, "client_1": 21}}
    history, failures = scripted_run(
        lambda r, cid, w: (declared[r][cid], moved(w, 0.01)), rounds=4)
    assert failures == [
        (1, "client_0", "num_samples must be an integer in [0, 2**53], got "
                        "1000000000000000000000000000000000000000"),
        (3, "client_0", "num_samples 1000000000 is more than the 10 of its first accepted update"),
        (4, "client_1", "num_samples 21 is more than the 20 of its first accepted update")]
    assert [row["num_samples"] for row in history] == [20, 30, 20, 5]


def test_the_bound_is_relative_to_the_median_of_the_updates_that_moved():
    """Of two, the nearer is the median; updates equal to the global model do not count."""
    two = {"client_0": 0.01, "client_1": 30.0}  # L2 over nn.Linear(2, 2)'s 6 values
    _, failures = scripted_run(lambda r, cid, w: (1, moved(w, two[cid])), rounds=1)
    assert [(cid, error) for _, cid, error in failures] == [(
        "client_1", "it is 73.5 from the global model, more than max_update_norm_ratio=1000 "
                    "times the round's median distance 0.0245")]
    _, failures = scripted_run(lambda r, cid, w: (1, moved(w, two[cid])), rounds=1,
                               max_update_norm_ratio=None)
    assert failures == []
    one_moved = {"client_0": 0.0, "client_1": 0.0, "client_2": 0.0, "client_3": 0.01}
    _, failures = scripted_run(lambda r, cid, w: (1, moved(w, one_moved[cid])), rounds=1,
                               clients=4)
    assert failures == []
