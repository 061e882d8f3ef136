"""Every algorithm on every runtime: the same history for the same seed, and exact resume (after
an interrupt at any round, and after SIGKILL)."""

from __future__ import annotations

from typing import Any

import pytest

import oiafed
from oiafed.state import load_state
from support import Interrupt, assert_same_weights, kill_and_resume, tiny_config, without_timing

ALGORITHMS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.1},
    "scaffold": {},
    "fednova": {},
    "feddyn": {"alpha": 0.1},
    "fedavgm": {},
    "fedadam": {"server_lr": 0.05},
    "fedyogi": {"server_lr": 0.05},
    "fedadagrad": {"server_lr": 0.05},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "krum": {"f": 1},
    "multi_krum": {"f": 1, "m": 3},
}


def config_of(name: str, rounds: int = 3, **sections: Any) -> dict[str, Any]:
    """Six digits clients with label skew, five sampled a round, one straggler in five."""
    defaults: dict[str, Any] = {
        "name": name,
        "data": {"type": "digits", "num_clients": 6,
                 "partition": {"type": "dirichlet", "args": {"alpha": 0.5, "min_size": 5}}},
        "trainer": {"args": {"rounds": rounds, "clients_per_round": 5,
                             "straggler_fraction": 0.2}},
        "learner": {"args": {"lr": 0.05, "batch_size": 32, "epochs": 2}},
        "aggregator": {"type": name, "args": ALGORITHMS[name]},
        "runtime": {"checkpoint_interval": 0},
    }
    return tiny_config(**{**defaults, **sections})




def test_every_algorithm_is_registered_with_its_halves():
    names = {n.split(".", 1)[1] for n in oiafed.registry.names("aggregator")}
    assert set(ALGORITHMS) <= names
    for name in ("fedprox", "scaffold", "fednova", "feddyn"):
        assert oiafed.validate(config_of(name)).learner.type == name


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, name):
    config = config_of(name, rounds=4)
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    assert all(row["accuracy"] == row["accuracy"] for row in whole.history)  # finite, not NaN
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(3)])
    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert_same_weights(resumed.weights, whole.weights)


def test_per_client_state_versions_are_collected(tmp_path):
    oiafed.run(config_of("scaffold", rounds=4), run_dir=tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run" / "client_state").iterdir())
    clients = [name.split("@")[0] for name in files]
    assert len(clients) == len(set(clients)) == 6  # one version per client once all is saved


@pytest.fixture(scope="module")
def shared_ray() -> Any:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every algorithm's serial result, computed once for the runtimes compared with it."""
    folder = tmp_path_factory.mktemp("serial")
    return {name: oiafed.run(config_of(name), run_dir=folder / name) for name in ALGORITHMS}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["parallel", "ray", "grpc"])
def test_every_algorithm_gives_the_serial_history_on_other_runtimes(tmp_path, request, mode,
                                                                    serial_results):
    names = list(ALGORITHMS)
    if mode == "ray":  # actors run the workers of the parallel runtime: each client half once
        request.getfixturevalue("shared_ray")
        names = ["fedavg", "fedprox", "scaffold", "fednova", "feddyn"]
    runtime = {"mode": mode, "workers": 2, "checkpoint_interval": 0}
    for name in names:
        serial = serial_results[name]
        other = oiafed.run(config_of(name, runtime=runtime), run_dir=tmp_path / name)
        assert without_timing(other.history) == without_timing(serial.history), name
        assert_same_weights(other.weights, serial.weights)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["scaffold", "fedadam"])  # client states; server optimizer
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, name):
    rows, whole = kill_and_resume(tmp_path, config_of(name, rounds=6))
    assert [row["round"] for row in rows] == list(range(1, 7))
    assert without_timing(rows) == without_timing(whole.history)
    assert_same_weights(load_state(tmp_path / "killed")["trainer"]["weights"], whole.weights)
