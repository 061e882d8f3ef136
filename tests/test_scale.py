"""Population scale: nothing per round costs O(total clients); 100,000 clients in small memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

import oiafed
from oiafed.attacks import SignFlip
from oiafed.callbacks.base import CallbackManager
from oiafed.config import DataConfig, load_config
from oiafed.core.aggregators import FedAvg
from oiafed.core.trainer import Trainer
from oiafed.core.types import ClientTask, Outcome, RoundTask
from oiafed.data.federated import MAX_CLIENTS, ClientIds, build_federated_data
from oiafed.data.leaf import LeafSynthetic
from oiafed.exceptions import ConfigError, SelectionError
from oiafed.run import Experiment, run_coroutine
from oiafed.seeding import TRAIN, derive_seed
from oiafed.testing import ScriptedRuntime
from support import PEAK_RSS, without_timing

GIB = 1024**3


def scale_config(num_clients: int, rounds: int = 3, sampled: int = 100) -> dict:
    return {
        "name": "scale", "seed": 11,
        "data": {"type": "synthetic", "num_clients": num_clients},
        "model": {"type": "logreg"},
        "trainer": {"args": {"rounds": rounds, "clients_per_round": sampled}},
        "learner": {"args": {"lr": 0.05, "batch_size": 20}},
    }


def checksum(data) -> list[float]:
    return [float(data.x.double().sum()), float(data.y.double().sum()), float(len(data))]


def test_100k_clients_run_in_a_subprocess_in_small_memory(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys, time
        import oiafed
        from oiafed.data.leaf import LeafSynthetic
        started = time.perf_counter()
        result = oiafed.run({scale_config(100_000)!r}, run_dir=sys.argv[1])
        wall = time.perf_counter() - started
        data = LeafSynthetic(11, 100_000).client_data("client_99999")
        print(json.dumps({{
            "peak_rss": {PEAK_RSS},
            "wall": wall, "rounds": result.rounds_completed,
            "history": result.history,
            "checksum": [float(data.x.double().sum()), float(data.y.double().sum()),
                         float(len(data))],
        }}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rounds"] == 3
    assert report["peak_rss"] < 1 * GIB, f"peak RSS {report['peak_rss'] / 2**20:.0f} MiB"
    assert report["wall"] < 60, f"3 rounds took {report['wall']:.1f} s"
    assert all(row["num_clients"] == 100 for row in report["history"])
    # Another process generated client 99,999 exactly as this one does.
    assert report["checksum"] == checksum(LeafSynthetic(11, 100_000).client_data("client_99999"))
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert partition["num_clients"] == 100_000 and len(partition["clients"]) == 100
    assert (tmp_path / "run" / "partition.json").stat().st_size < 100_000


def test_a_round_generates_only_the_sampled_clients() -> None:
    experiment = Experiment.build(load_config(scale_config(100_000, rounds=3, sampled=50)))
    data = experiment.data
    assert isinstance(data, LeafSynthetic)
    before = data.generated
    assert before == 100  # the test set's clients
    result = run_coroutine(experiment.trainer.fit())
    assert result.rounds_completed == 3
    assert data.generated - before <= 3 * 50
    assert data.num_cached() <= data.cache_clients


def test_same_config_and_seed_same_history_at_scale() -> None:
    config = scale_config(10_000, rounds=3, sampled=30)
    first = Experiment.build(load_config(config))
    second = Experiment.build(load_config(config))
    one = run_coroutine(first.trainer.fit())
    two = run_coroutine(second.trainer.fit())
    assert without_timing(one.history) == without_timing(two.history)
    assert all(torch.equal(one.weights[k], two.weights[k]) for k in one.weights)
    other = run_coroutine(Experiment.build(load_config({**config, "seed": 12})).trainer.fit())
    assert without_timing(other.history) != without_timing(one.history)


def test_run_folder_runs_of_a_large_federation_agree(tmp_path: Path) -> None:
    config = scale_config(20_000, rounds=2, sampled=10)
    one = oiafed.run(config, run_dir=tmp_path / "one")
    two = oiafed.run(config, run_dir=tmp_path / "two")
    assert without_timing(one.history) == without_timing(two.history)
    assert ((tmp_path / "one" / "partition.json").read_text()
            == (tmp_path / "two" / "partition.json").read_text())


def selection_seconds(num_clients: int, repeats: int = 50) -> float:
    trainer = Trainer(rounds=repeats, clients_per_round=100)
    trainer.client_ids = ClientIds(num_clients)  # bind() would list them once; not per round
    trainer.seed = 0
    started = time.perf_counter()
    for round_num in range(1, repeats + 1):
        picked = trainer.select_clients(round_num)
        assert len(picked) == min(100, num_clients) and len(set(picked)) == len(picked)
    return (time.perf_counter() - started) / repeats


def test_selecting_100_clients_costs_the_same_for_any_population() -> None:
    small, huge = selection_seconds(1_000), selection_seconds(10_000_000)
    assert huge < 0.002, f"{huge * 1e6:.0f} us per selection of 100 of 10,000,000"
    assert huge < 10 * small + 0.0005


def test_selection_stays_deterministic_per_round() -> None:
    trainer = Trainer(rounds=3, clients_per_round=5)
    trainer.client_ids = ClientIds(100_000)
    trainer.seed = 3
    first = [trainer.select_clients(r) for r in (1, 2, 3)]
    assert [trainer.select_clients(r) for r in (1, 2, 3)] == first
    assert len({tuple(ids) for ids in first}) == 3


# -- client ids cost nothing per client not sampled ---------------------------------------------


@pytest.mark.slow
def test_10_million_clients_build_and_run_without_memory_per_client(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json
        from oiafed.config import load_config
        from oiafed.run import Experiment, run_coroutine
        cfg = load_config({scale_config(10_000_000, rounds=2, sampled=10)!r})
        before = {PEAK_RSS}
        result = run_coroutine(Experiment.build(cfg).trainer.fit())
        after = {PEAK_RSS}
        print(json.dumps({{"growth": after - before, "history": result.history}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=240, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["num_clients"] for row in report["history"]] == [10, 10]
    # ~90 MiB whatever the federation's size; listed ids cost ~100 bytes each (~950 MiB here).
    assert report["growth"] < 300 * 2**20, f"grew {report['growth'] / 2**20:.0f} MiB"


class RecordingRuntime(ScriptedRuntime):
    """``ScriptedRuntime`` that keeps every client task it was given."""

    def __init__(self) -> None:
        self.tasks: list[ClientTask] = []

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        self.tasks.extend(clients)
        return await super().train(task, clients, deadline)


def test_a_trainer_of_a_million_client_ids_stores_none_of_them() -> None:
    ids, last = ClientIds(1_000_000), "client_999999"
    trainer, runtime = Trainer(rounds=1, clients_per_round=2), RecordingRuntime()
    tracemalloc.start()
    try:
        trainer.bind(model=nn.Linear(2, 2), aggregator=FedAvg(), runtime=runtime,
                     callbacks=CallbackManager(), test_data=None, client_ids=ids, seed=5,
                     attack=SignFlip(clients=[last]))
        trainer.client_selection_weights = {last: 1.0, "client_7": 1.0}
        result = run_coroutine(trainer.fit())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A set of the ids alone would take ~100 MB; membership, index and attack need none.
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert result.rounds_completed == 1 and trainer.attacked == {last}
    assert [(t.client_id, t.seed) for t in runtime.tasks] == [
        ("client_7", derive_seed(5, TRAIN, 1, 7)), (last, derive_seed(5, TRAIN, 1, 999_999))]
    trainer.client_selection_weights = {"client_1000000": 1.0}
    with pytest.raises(SelectionError, match="unknown client 'client_1000000'"):
        trainer.select_clients(2)
    with pytest.raises(ConfigError, match="'client_01'") as info:
        SignFlip(clients=["client_01"]).choose(ids, 0)
    assert info.value.path == "attack.args.clients"


def test_federations_up_to_2_to_the_53_clients_build_and_larger_ones_are_config_errors() -> None:
    for num_clients in (MAX_CLIENTS + 1, 2**63, 10**30):
        cfg = DataConfig.model_validate({"type": "synthetic", "num_clients": num_clients})
        with pytest.raises(ConfigError, match=r"at most 2\*\*53") as info:
            build_federated_data(cfg, 0)
        assert info.value.path == "data.num_clients"
        with pytest.raises(ValueError, match="num_clients must be in"):
            ClientIds(num_clients)
    cfg = DataConfig.model_validate({"type": "synthetic", "num_clients": MAX_CLIENTS,
                                     "args": {"test_clients": 3}})
    data = build_federated_data(cfg, 0)
    last = data.client_ids[-1]
    assert data.num_clients == MAX_CLIENTS and last == f"client_{MAX_CLIENTS - 1}"
    assert data.index_of(last) == MAX_CLIENTS - 1 and len(data.client_data(last)) > 0
