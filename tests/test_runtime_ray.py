"""The Ray runtime on a real local Ray instance: same hooks and history as serial, epoch hooks in
the actors, a dead actor replaced and its client retried, failures reported, never a hang.

Ray starts slowly, so there are few runs: one on a Ray instance the runtime starts (and shuts
down) itself, the others on one instance shared by this module.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oiafed
from oiafed.exceptions import ConfigError, WorkerError
from support import RegistrySnapshot, tiny_config
from test_runtime_parallel import (
    HELPERS,
    Recorder,
    assert_same_history,
    epoch_log,
    expected_trace,
    log_pids,
)

MODULE = "oiafed_ray_test_helpers"
CLIENTS = ["client_0", "client_1", "client_2", "client_3"]


@pytest.fixture(scope="module")
def helpers_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding the helpers user module, on ``sys.path`` for this module's tests."""
    folder = tmp_path_factory.mktemp("ray_helpers")
    (folder / f"{MODULE}.py").write_text(HELPERS, encoding="utf-8")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture
def helpers(helpers_dir: Path) -> Iterator[str]:
    """The helpers module name; its registrations are dropped after the test."""
    with RegistrySnapshot():
        yield MODULE
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def shared_ray(helpers_dir: Path) -> Iterator[Any]:
    """One local Ray instance (2 CPUs) for the module, started by the test, not the runtime."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(helpers_dir)}})
    yield ray
    ray.shutdown()


def ray_config(config: dict[str, Any], **runtime: Any) -> dict[str, Any]:
    return {**config, "runtime": {"mode": "ray", **runtime}}


def test_a_missing_ray_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does when it is not installed
    with pytest.raises(ConfigError, match=r"runtime.mode.*pip install 'oiafed\[ray\]'"):
        oiafed.run(ray_config(tiny_config()), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unreachable_cluster_fails_fast_naming_the_address(tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(WorkerError, match=r"cannot reach the Ray cluster at '127.0.0.1:1'"):
        oiafed.run(ray_config(tiny_config(), address="127.0.0.1:1"), run_dir=tmp_path / "run")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_gives_the_serial_history_with_epoch_hooks_in_the_actors(tmp_path, helpers, caplog):
    """Runs first: the runtime starts a local Ray instance for the run and shuts it down."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    base = tiny_config(imports=[helpers], trainer={"args": {"rounds": 2}},
                       learner={"args": {"epochs": 2, "lr": 0.05}})
    serial_log, ray_log = tmp_path / "serial.log", tmp_path / "ray.log"
    serial = oiafed.run({**base, "callbacks": [{"type": "pid_log", "args": {"path": str(serial_log)}}]},
                        run_dir=tmp_path / "serial")
    recorder = Recorder()
    with caplog.at_level(logging.WARNING, logger="oiafed"):
        result = oiafed.run(
            ray_config({**base, "callbacks": [{"type": "pid_log", "args": {"path": str(ray_log)}}]},
                       workers=2),
            run_dir=tmp_path / "ray", callbacks=[recorder])
    assert not ray.is_initialized(), "a Ray instance the runtime started is shut down"
    assert recorder.trace == expected_trace(2, CLIENTS, 2, epoch_hooks=False)
    assert any("Recorder" in r.getMessage() and "only in serial mode" in r.getMessage()
               for r in caplog.records)
    pids = log_pids(ray_log)
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    per_client = [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert epoch_log(ray_log) == epoch_log(serial_log) == {
        (r, c): per_client for r in (1, 2) for c in CLIENTS}
    assert_same_history(result.history, serial.history)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dead_actor_is_replaced_and_its_client_retried(tmp_path, helpers, shared_ray):
    marker = tmp_path / "killed"
    config = tiny_config(imports=[helpers], trainer={"args": {"rounds": 2}},
                         learner={"type": "fragile", "args": {"lr": 0.05, "marker": str(marker)}})
    serial = oiafed.run(tiny_config(trainer={"args": {"rounds": 2}}), run_dir=tmp_path / "serial")
    recorder = Recorder()
    result = oiafed.run(ray_config(config), run_dir=tmp_path / "ray", callbacks=[recorder])
    assert marker.exists(), "the actor training client_1 killed its process"
    assert not [t for t in recorder.trace if t[0] == "on_client_failure"]
    assert_same_history(result.history, serial.history)
    assert shared_ray.is_initialized(), "a Ray instance the user started is left running"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_actor_that_dies_every_time_gives_a_client_failure(tmp_path, helpers, shared_ray):
    config = tiny_config(imports=[helpers], trainer={"args": {"rounds": 1}},
                         learner={"type": "fragile",
                                  "args": {"lr": 0.05, "marker": str(tmp_path / "killed"),
                                           "always": True}})
    recorder = Recorder()
    result = oiafed.run(ray_config(config, workers=2), run_dir=tmp_path / "ray",
                        callbacks=[recorder])
    failures = [t for t in recorder.trace if t[0] == "on_client_failure"]
    assert [f[1] for f in failures] == ["client_1"] and "died 2 times" in failures[0][2]
    assert result.history[0]["num_clients"] == 3
