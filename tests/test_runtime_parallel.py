"""The parallel runtime with real worker processes: same hooks and history as serial, epoch hooks
in the workers, dead and hung workers replaced, failures reported, never a hang."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

import oiafed
from oiafed.config import load_config
from oiafed.exceptions import ClientTrainingError, WorkerError
from oiafed.runtime.parallel import ParallelRuntime
from support import Recorder, tiny_config, without_timing

HELPERS = '''
"""Components whose code must be importable in worker processes (a user module)."""
import os
import signal
import time

from oiafed import Callback, Learner, register


@register("callback.pid_log")
class PidLog(Callback):
    """Appends ``pid round client hook epoch`` for every epoch hook, where the learner runs."""

    def __init__(self, path):
        self.path = path

    def _write(self, learner, hook, epoch):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {learner.round_num} {learner.client_id} {hook} {epoch}\\n")

    async def on_epoch_start(self, learner, epoch, **kwargs):
        self._write(learner, "start", epoch)

    def on_epoch_end(self, learner, epoch, metrics, **kwargs):
        self._write(learner, "end", epoch)


@register("learner.fragile")
class Fragile(Learner):
    """A default learner that misbehaves when it trains ``victim``: it kills its own process
    (the first time only, recorded in ``marker``, unless ``always``), sleeps ``hang`` seconds
    (the first time), or raises (``fail``)."""

    def __init__(self, victim="client_1", marker="", always=False, hang=0.0, fail=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.victim, self.marker, self.always = victim, marker, always
        self.hang, self.fail = hang, fail

    async def fit(self, client_id, weights, data, **kwargs):
        if client_id == self.victim:
            if self.fail:
                raise ValueError(f"cannot train {client_id}")
            first = not os.path.exists(self.marker)
            if first or self.always:
                open(self.marker, "a").close()
                if self.hang:
                    time.sleep(self.hang)
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
        return await super().fit(client_id, weights, data, **kwargs)
'''


def expected_trace(rounds: int, clients: list[str], epochs: int, *, epoch_hooks: bool
                   ) -> list[tuple]:
    """The golden hook order of a run where every client succeeds."""
    trace: list[tuple] = [("on_train_start",)]
    for round_num in range(1, rounds + 1):
        trace.append(("on_round_start", round_num))
        if epoch_hooks:
            for client in clients:
                for epoch in range(1, epochs + 1):
                    trace.append(("on_epoch_start", client, epoch))
                    trace.append(("on_epoch_end", client, epoch, ["accuracy", "loss"]))
        trace += [("on_aggregate_start", clients), ("on_aggregate_end", ["1.bias", "1.weight"]),
                  ("on_round_end", round_num, round_num)]
    trace.append(("on_train_end", rounds))
    return trace


def assert_same_history(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Equal histories up to float tolerance (wall-clock fields left out)."""
    actual, expected = without_timing(actual), without_timing(expected)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def epoch_log(path: Path) -> dict[tuple[int, str], list[tuple[str, int]]]:
    """``pid_log`` lines grouped by (round, client), in file order, and the pids seen."""
    grouped: dict[tuple[int, str], list[tuple[str, int]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        _pid, round_num, client, hook, epoch = line.split()
        grouped.setdefault((int(round_num), client), []).append((hook, int(epoch)))
    return grouped


def log_pids(path: Path) -> set[int]:
    return {int(line.split()[0]) for line in path.read_text(encoding="utf-8").splitlines()}


@pytest.fixture
def helpers(user_module, tmp_path, monkeypatch):
    """The ``helpers`` user module, importable here and in spawned worker processes."""
    module = user_module("oiafed_test_helpers", HELPERS)
    path = os.pathsep.join(filter(None, [str(module.parent), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    return "oiafed_test_helpers"


def parallel(config: dict[str, Any], workers: int = 2, **runtime: Any) -> dict[str, Any]:
    return {**config, "runtime": {"mode": "parallel", "workers": workers, **runtime}}


def fragile_config(helpers: str, rounds: int, **learner_args: Any) -> dict[str, Any]:
    return tiny_config(imports=[helpers], trainer={"args": {"rounds": rounds}},
                       learner={"type": "fragile",
                                "args": {"lr": 0.05, "batch_size": 32, **learner_args}})


def no_workers_left() -> bool:
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def test_default_worker_count_is_the_cpu_count():
    cfg = load_config(tiny_config(runtime={"mode": "parallel"}))
    assert ParallelRuntime(cfg).num_workers == os.cpu_count()
    cfg = load_config(tiny_config(runtime={"mode": "parallel", "workers": 3}))
    assert ParallelRuntime(cfg).num_workers == 3


def test_golden_hooks_epoch_hooks_in_workers_and_history_equal_to_serial(
        tmp_path, helpers, caplog):
    clients = ["client_0", "client_1", "client_2", "client_3"]
    base = tiny_config(imports=[helpers], trainer={"args": {"rounds": 2}},
                       learner={"args": {"epochs": 2, "lr": 0.05}})
    serial_log, parallel_log = tmp_path / "serial.log", tmp_path / "parallel.log"
    serial_recorder, parallel_recorder = Recorder(), Recorder()

    serial = oiafed.run({**base, "callbacks": [{"type": "pid_log", "args": {"path": str(serial_log)}}]},
                        run_dir=tmp_path / "serial", callbacks=[serial_recorder])
    with caplog.at_level(logging.WARNING, logger="oiafed"):
        result = oiafed.run(
            parallel({**base, "callbacks": [{"type": "pid_log", "args": {"path": str(parallel_log)}}]}),
            run_dir=tmp_path / "parallel", callbacks=[parallel_recorder])

    # trainer hooks in the driver, in the golden order; epoch hooks of the instance do not run
    assert serial_recorder.trace == expected_trace(2, clients, 2, epoch_hooks=True)
    assert parallel_recorder.trace == expected_trace(2, clients, 2, epoch_hooks=False)
    assert any("Recorder" in r.getMessage() and "only in serial mode" in r.getMessage()
               for r in caplog.records)
    # the configured callback's epoch hooks ran in the worker processes, in order per client
    pids = log_pids(parallel_log)
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert log_pids(serial_log) == {os.getpid()}
    per_client = [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert epoch_log(parallel_log) == epoch_log(serial_log) == {
        (r, c): per_client for r in (1, 2) for c in clients}
    # the same numbers
    assert_same_history(result.history, serial.history)
    for key, value in serial.weights.items():
        assert result.weights[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert no_workers_left()


def test_a_killed_worker_is_replaced_and_its_client_retried(tmp_path, helpers, caplog):
    marker = tmp_path / "killed"
    config = fragile_config(helpers, rounds=2, marker=str(marker))
    serial = oiafed.run(tiny_config(trainer={"args": {"rounds": 2}}), run_dir=tmp_path / "serial")
    recorder = Recorder()
    with caplog.at_level(logging.WARNING, logger="oiafed"):
        result = oiafed.run(parallel(config), run_dir=tmp_path / "parallel", callbacks=[recorder])
    assert marker.exists(), "the worker training client_1 killed itself"
    assert any("killed by SIGKILL" in r.getMessage() and "client_1 is retried" in r.getMessage()
               for r in caplog.records)
    assert not [t for t in recorder.trace if t[0] == "on_client_failure"]
    assert [row["num_clients"] for row in result.history] == [4, 4]
    assert_same_history(result.history, serial.history)
    assert no_workers_left()


def test_a_worker_that_dies_every_time_gives_a_client_failure(tmp_path, helpers):
    config = fragile_config(helpers, rounds=1, marker=str(tmp_path / "killed"), always=True)
    recorder = Recorder()
    result = oiafed.run(parallel(config), run_dir=tmp_path / "run", callbacks=[recorder])
    failures = [t for t in recorder.trace if t[0] == "on_client_failure"]
    assert len(failures) == 1 and failures[0][1] == "client_1"
    assert "killed by SIGKILL" in failures[0][2] and "2 times" in failures[0][2]
    assert ("on_aggregate_start", ["client_0", "client_2", "client_3"]) in recorder.trace
    assert result.history[0]["num_clients"] == 3
    assert result.rounds_completed == 1
    assert no_workers_left()


def test_round_timeout_fails_a_hung_client_and_replaces_its_worker(tmp_path, helpers):
    config = fragile_config(helpers, rounds=2, marker=str(tmp_path / "hung"), hang=120.0)
    config["trainer"]["args"]["round_timeout"] = 8.0
    recorder = Recorder()
    started = time.monotonic()
    result = oiafed.run(parallel(config), run_dir=tmp_path / "run", callbacks=[recorder])
    assert time.monotonic() - started < 100, "the hung client must not hold the run"
    failures = [t for t in recorder.trace if t[0] == "on_client_failure"]
    assert [(f[1], "round_timeout=8s" in f[2]) for f in failures] == [("client_1", True)]
    assert [row["num_clients"] for row in result.history] == [3, 4]
    assert no_workers_left()


def test_a_free_worker_takes_the_client_queued_behind_a_slow_one_and_it_trains_once(
        tmp_path, helpers):
    log = tmp_path / "epochs.log"
    config = fragile_config(helpers, rounds=1, marker=str(tmp_path / "slow"), hang=3.0)
    config["callbacks"] = [{"type": "pid_log", "args": {"path": str(log)}}]
    serial = oiafed.run({**config, "learner": {"args": {"lr": 0.05, "batch_size": 32}}},
                        run_dir=tmp_path / "serial")
    log.unlink()
    # client_0 and client_2 go to one worker, client_1 (slow) and client_3 to the other
    result = oiafed.run(parallel(config), run_dir=tmp_path / "run")
    assert_same_history(result.history, serial.history)
    lines = [line.split() for line in log.read_text().splitlines()]
    pid_of = {client: pid for pid, _, client, _, _ in lines}
    assert pid_of["client_3"] == pid_of["client_2"] != pid_of["client_1"]  # taken over
    assert [(c, h) for _, _, c, h, _ in lines].count(("client_3", "start")) == 1  # once
    assert no_workers_left()


def test_an_exception_in_local_training_is_a_client_failure_or_stops_a_strict_run(
        tmp_path, helpers):
    config = fragile_config(helpers, rounds=1, victim="client_2", fail=True)
    recorder = Recorder()
    result = oiafed.run(parallel(config), run_dir=tmp_path / "run", callbacks=[recorder])
    failures = [t for t in recorder.trace if t[0] == "on_client_failure"]
    assert [f[1] for f in failures] == ["client_2"]
    assert failures[0][2].startswith("Traceback (most recent call last)")
    assert failures[0][2].rstrip().endswith("ValueError: cannot train client_2")
    assert result.history[0]["num_clients"] == 3
    with pytest.raises(ClientTrainingError, match=r"training client_2 raised(.|\n)*cannot train"):
        oiafed.run(parallel({**config, "strict": True}), run_dir=tmp_path / "strict")
    assert no_workers_left()


def test_a_worker_that_cannot_start_fails_the_run_clearly(tmp_path, user_module, monkeypatch):
    module = user_module("oiafed_test_driver_only", '''
        import multiprocessing
        if multiprocessing.parent_process() is not None:
            raise RuntimeError("this module refuses to load in a worker")
    ''')
    monkeypatch.setenv("PYTHONPATH", str(module.parent))
    config = parallel(tiny_config(imports=["oiafed_test_driver_only"]))
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"failed to start.*refuses to load in a worker"):
        oiafed.run(config, run_dir=tmp_path / "run")
    assert time.monotonic() - started < 120
    assert no_workers_left()
