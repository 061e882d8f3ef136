"""Population scale: nothing per round costs O(total clients); 100,000 clients in small memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import oiafed
from oiafed.config import load_config
from oiafed.core.trainer import Trainer
from oiafed.data.federated import ClientIds
from oiafed.data.leaf import LeafSynthetic
from oiafed.run import Experiment, run_coroutine
from support import without_timing

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
        import json, resource, sys, time
        import oiafed
        from oiafed.data.leaf import LeafSynthetic
        started = time.perf_counter()
        result = oiafed.run({scale_config(100_000)!r}, run_dir=sys.argv[1])
        wall = time.perf_counter() - started
        data = LeafSynthetic(11, 100_000).client_data("client_99999")
        print(json.dumps({{
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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
