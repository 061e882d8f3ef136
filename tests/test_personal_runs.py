"""Personal evaluation in whole runs: each client counted once, equal to a direct evaluation of
its stored personal model, the same in every runtime, exact after SIGKILL and resume."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import oiafed
from oiafed.algorithms.personal import load_personal
from oiafed.core import trainer as trainer_module
from oiafed.core.client_states import ClientStates
from oiafed.core.evaluation import evaluate
from oiafed.core.learner import Learner
from oiafed.data.federated import build_federated_data
from oiafed.exceptions import ConfigError
from oiafed.registry import register
from oiafed.runtime.worker import build_model
from oiafed.state import load_state
from support import assert_same_weights, kill_and_resume, tiny_config, without_timing


def config_of(method: str, rounds: int = 2, **sections: Any) -> dict[str, Any]:
    """Six digits clients with label skew, three sampled a round, a fifth of each held out."""
    defaults: dict[str, Any] = {
        "name": method,
        "data": {"type": "digits", "num_clients": 6, "local_test_fraction": 0.2,
                 "partition": {"type": "dirichlet", "args": {"alpha": 0.3, "min_size": 10}}},
        "model": {"type": "mlp", "args": {"hidden": [16]}},
        "trainer": {"args": {"rounds": rounds, "clients_per_round": 3}},
        "aggregator": {"type": method, "args": {"head_epochs": 2} if method == "fedrep" else {}},
        "runtime": {"checkpoint_interval": 0},
    }
    return tiny_config(**{**defaults, **sections})


@pytest.mark.parametrize("method", ["ditto", "fedper", "fedrep"])
def test_personal_metrics_count_each_client_once_and_equal_a_direct_evaluation(tmp_path, method):
    """Ditto: the stored personal model; FedPer and FedRep: the global body and the stored
    head, evaluated as they are (no training)."""
    result = oiafed.run(config_of(method), run_dir=tmp_path / "run")
    cfg = oiafed.load_config(config_of(method))
    data = build_federated_data(cfg.data, cfg.seed)
    states = ClientStates(tmp_path / "run" / "client_state")
    model = build_model(cfg, data)
    accuracies, losses, sizes = [], [], []
    for cid in data.client_ids:
        model.load_state_dict(result.weights)
        state = states.get(cid)
        if state is not None:  # trained: its personal model; else the global one
            load_personal(model, state)
        scores = evaluate(model, data.client_test_data(cid))
        accuracies.append(scores["accuracy"])
        losses.append(scores["loss"])
        sizes.append(len(data.client_test_data(cid)))
    assert len(list(states.folder.iterdir())) >= 3  # personal models were stored
    last = result.history[-1]
    assert last["personal_clients"] == 6
    assert last["personal_accuracy"] == pytest.approx(np.average(accuracies, weights=sizes))
    assert last["personal_loss"] == pytest.approx(np.average(losses, weights=sizes))
    assert last["personal_accuracy_min"] == pytest.approx(min(accuracies))
    assert last["personal_accuracy_p10"] == pytest.approx(np.percentile(accuracies, 10))
    assert last["personal_accuracy_median"] == pytest.approx(np.median(accuracies))


def test_evaluating_in_chunks_of_one_client_changes_no_metric(tmp_path, monkeypatch):
    one_a_round = config_of("ditto", trainer={"args": {"rounds": 2, "clients_per_round": 1}})
    whole = oiafed.run(one_a_round, run_dir=tmp_path / "whole")
    monkeypatch.setattr(trainer_module, "EVAL_CHUNK", 1)  # six runtime calls of one client
    chunked = oiafed.run(one_a_round, run_dir=tmp_path / "chunked")
    assert without_timing(chunked.history) == without_timing(whole.history)
    last = chunked.history[-1]
    assert last["personal_clients"] == 6
    assert last["personal_eval_time"] > 0 and last["round_time"] > 0
    assert last["personal_eval_failed"] == 0


def test_fedper_with_an_empty_head_is_fedavg(tmp_path):
    fedper = oiafed.run(config_of("fedper", aggregator={"type": "fedper", "args": {"head": []}}),
                        run_dir=tmp_path / "fedper")
    fedavg = oiafed.run(config_of("fedavg"), run_dir=tmp_path / "fedavg")
    assert without_timing(fedper.history) == without_timing(fedavg.history)
    assert_same_weights(fedper.weights, fedavg.weights)


def test_an_evaluated_sample_does_not_change_training(tmp_path):
    sample = config_of("fedper", trainer={"args": {"rounds": 2, "clients_per_round": 3,
                                                   "personal_eval_clients": 2}})
    sampled = oiafed.run(sample, run_dir=tmp_path / "sampled")
    whole = oiafed.run(config_of("fedper"), run_dir=tmp_path / "whole")
    assert sampled.history[-1]["personal_clients"] == 2
    for a, b in zip(sampled.history, whole.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["accuracy"] == b["accuracy"]


class FailsOneEvaluation(Learner):
    """Evaluates as the default learner, but client_2's personal evaluation raises."""

    async def evaluate_personal(self, client_id, *args, **kwargs):
        if client_id == "client_2":
            raise RuntimeError("no evaluation here")
        return await super().evaluate_personal(client_id, *args, **kwargs)


def test_a_failed_personal_evaluation_is_left_out_and_counted(tmp_path, clean_registry, caplog):
    register("learner.fails_one_evaluation")(FailsOneEvaluation)
    result = oiafed.run(config_of("fedavg", learner={"type": "fails_one_evaluation"}),
                        run_dir=tmp_path / "run")
    for row in result.history:
        assert row["personal_clients"] == 5 and row["personal_eval_failed"] == 1
    assert "personal evaluation left out 1 of 6 client(s); client_2" in caplog.text
    assert result.history[-1]["num_clients"] == 3  # training went on as before


def test_bad_input_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as error:
        oiafed.run(config_of("fedrep", aggregator={"type": "fedrep", "args": {"head": "fc"}}),
                   run_dir=tmp_path / "head")
    assert error.value.path == "aggregator.args.head"
    crowded = config_of("fedavg", data={"type": "digits", "num_clients": 1437,
                                        "local_test_fraction": 0.9})
    with pytest.raises(ConfigError) as error:
        oiafed.run(crowded, run_dir=tmp_path / "crowded")
    assert error.value.path == "data.local_test_fraction"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["parallel", "grpc"])
def test_personal_evaluation_runs_where_the_data_lives(tmp_path, mode):
    serial = oiafed.run(config_of("fedrep"), run_dir=tmp_path / "serial")
    other = oiafed.run(config_of("fedrep", runtime={"mode": mode, "workers": 2,
                                                    "checkpoint_interval": 0}),
                       run_dir=tmp_path / mode)
    assert "personal_accuracy" in other.history[-1]
    assert without_timing(other.history) == without_timing(serial.history)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["ditto"])  # the personal states of all: one path
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, method):
    rows, whole = kill_and_resume(tmp_path, config_of(method, rounds=4), after_rounds=2)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert "personal_accuracy" in rows[-1]
    assert without_timing(rows) == without_timing(whole.history)
    assert_same_weights(load_state(tmp_path / "killed")["trainer"]["weights"], whole.weights)
