"""The runtime contract, proven on all four runtimes (serial, parallel, ray, grpc in loopback).

* The golden lifecycle: a recorder built by introspecting ``Callback`` (a hook added to it
  cannot be missed) runs one small config on every runtime; the trainer hooks give one ordered
  trace (``on_client_join`` aside: only a deployment has clients that join), the epoch hooks
  one set per (round, client), and the histories are equal.
* The failure policy of ``RoundLedger``: training that raises, strict mode, a ``fit_config``
  that is not JSON, the round deadline and a dying worker give the same hooks, histories and
  errors everywhere.

The recorder and the misbehaving learner live in a user module that every process imports:
configured under ``callbacks:``/``learner:``, they are rebuilt where learners run, and write
JSON lines to files (appended: the writers are other processes).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oiafed
from oiafed.callbacks.base import HOOKS, Callback, overrides
from oiafed.exceptions import ClientTrainingError, ConfigError
from support import RegistrySnapshot, module_folder, tiny_config, without_timing

MODULE = "oiafed_contract_helpers"
CLIENTS = ["client_0", "client_1", "client_2", "client_3"]
RUNTIMES = ["serial", "parallel", "ray", "grpc"]
EPOCH_HOOKS = {"on_epoch_start", "on_epoch_end"}

HELPERS = '''
"""Components the contract tests configure; importable in every process of a run."""
import inspect
import json
import os
import signal
import time

from oiafed import Callback, Learner, register


def _append(path, record):
    line = (json.dumps(record, sort_keys=True) + "\\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: lines of several processes never mix
    finally:
        os.close(fd)


def _result(result):
    if hasattr(result, "rounds_completed"):  # TrainResult
        return ["train", result.rounds_completed, result.stop_reason]
    return ["round", result.round_num, [u.client_id for u in result.updates]]


# How each parameter of a hook is recorded. A hook with a parameter missing here cannot be
# recorded: building the recorder fails, so a hook added to Callback cannot go unnoticed.
DESCRIBE = {
    "trainer": lambda trainer: trainer.round_num,
    "learner": lambda learner: [learner.round_num, learner.client_id],
    "round_num": int,
    "result": _result,
    "epoch": int,
    "metrics": sorted,
    "updates": lambda updates: [u.client_id for u in updates],
    "weights": sorted,
    "client_id": str,
    "error": str,
    "exception": lambda exc: [type(exc).__name__, str(exc)],
}

HOOK_NAMES = sorted(name for name, _ in inspect.getmembers(Callback, inspect.isfunction)
                    if name.startswith("on_"))


def _recording(hook):
    signature = inspect.signature(getattr(Callback, hook))
    params = [p.name for p in signature.parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [name for name in params if name not in DESCRIBE]
    if unknown:
        raise TypeError(f"the trace recorder cannot record {hook}{signature}: "
                        f"add {unknown} to DESCRIBE")

    def record(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        entry = {"hook": hook, "pid": os.getpid(),
                 "extra": sorted(bound.arguments.get("kwargs", {}))}
        for name in params:
            entry[name] = DESCRIBE[name](bound.arguments[name])
        _append(self.path, entry)

    record.__name__ = record.__qualname__ = hook
    return record


def _init(self, path):
    self.path = path


Trace = register("callback.trace")(type("Trace", (Callback,), {
    "__init__": _init,
    "__doc__": "Appends every hook call (one JSON line, with what identifies it) to path.",
    **{hook: _recording(hook) for hook in HOOK_NAMES},
}))


@register("callback.poison_fit_config")
class PoisonFitConfig(Callback):
    """Puts a value that is not JSON into trainer.fit_config."""

    async def on_round_start(self, trainer, round_num, **kwargs):
        trainer.fit_config["bad"] = object()


@register("learner.misbehave")
class Misbehave(Learner):
    """The default learner, except for one client (``victim``): it raises ``ValueError``
    (``fail``), sleeps ``sleep`` seconds in round 1, or kills its own process (``kill``).
    Every start of the victim's training is a line in ``attempts``."""

    def __init__(self, victim="client_2", fail=False, sleep=0.0, kill=False, attempts="",
                 **kwargs):
        super().__init__(**kwargs)
        self.victim, self.fail, self.sleep, self.kill = victim, fail, sleep, kill
        self.attempts = attempts
        if sleep:
            # A process's first optimizer step imports torch._dynamo (~1 s of CPU; 4 client
            # processes on 2 cores take longer than a short deadline): done here, as the
            # worker is built, so that the deadline measures the sleep, not a lazy import.
            import torch._dynamo  # noqa: F401

    async def fit(self, client_id, weights, data, **kwargs):
        if client_id == self.victim:
            if self.attempts:
                _append(self.attempts, {"pid": os.getpid(), "round": kwargs["round_num"]})
            if self.fail:
                raise ValueError(f"cannot train {client_id}")
            if self.sleep and kwargs["round_num"] == 1:
                time.sleep(self.sleep)
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
        return await super().fit(client_id, weights, data, **kwargs)
'''


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helpers_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The helpers module's folder: on ``sys.path`` and ``$PYTHONPATH`` (spawned workers,
    client processes) for this module's tests."""
    with module_folder(tmp_path_factory.mktemp("contract_helpers"), MODULE, HELPERS) as folder:
        yield folder


@pytest.fixture
def helpers(helpers_dir: Path) -> Iterator[Any]:
    """The helpers module, imported; its registrations are dropped after the test."""
    with RegistrySnapshot():
        sys.modules.pop(MODULE, None)
        module = __import__(MODULE)
        yield module
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def shared_ray(helpers_dir: Path) -> Iterator[Any]:
    """One local Ray instance (2 CPUs) for the whole module; Ray starts slowly."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(helpers_dir)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def runtime_of(request: pytest.FixtureRequest):
    """``runtime_of(mode)``: the ``runtime:`` section of ``mode`` (Ray: the shared instance)."""

    def section(mode: str) -> dict[str, Any]:
        if mode == "ray":
            request.getfixturevalue("shared_ray")
        return {"serial": {"mode": "serial"},
                "parallel": {"mode": "parallel", "workers": 2},
                "ray": {"mode": "ray", "workers": 2},
                "grpc": {"mode": "grpc"}}[mode]

    return section


def runtimes(*modes: str) -> list[Any]:
    """``modes`` as parameters; all but serial start processes, so they are slow."""
    return [pytest.param(m, marks=[] if m == "serial" else [pytest.mark.slow]) for m in modes]


# -- reading what the recorder wrote ---------------------------------------------------------------


def read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def trainer_trace(records: list[dict[str, Any]], *, joins: bool = False) -> list[dict[str, Any]]:
    """The trainer-level calls in order, without the pid (and without joins unless asked)."""
    return [{k: v for k, v in r.items() if k != "pid"} for r in records
            if r["hook"] not in EPOCH_HOOKS and (joins or r["hook"] != "on_client_join")]


def epoch_calls(records: list[dict[str, Any]]) -> dict[tuple[int, str], set[tuple]]:
    """The epoch hooks as a set per (round, client)."""
    calls: dict[tuple[int, str], set[tuple]] = {}
    for r in records:
        if r["hook"] in EPOCH_HOOKS:
            round_num, client = r["learner"]
            calls.setdefault((round_num, client), set()).add(
                (r["hook"], r["epoch"], tuple(r.get("metrics", ()))))
    return calls


def hooks_of(trace: list[dict[str, Any]]) -> list[tuple]:
    """The trace as (hook, round) pairs, with the failed client where there is one."""
    return [(r["hook"], r["trainer"], *([r["client_id"]] if "client_id" in r else []))
            for r in trace]


def assert_same_history(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    actual, expected = without_timing(actual), without_timing(expected)
    assert [sorted(row) for row in actual] == [sorted(row) for row in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6)


def no_workers_left() -> bool:
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


def contract_config(rounds: int, trace: Path, *, learner: dict[str, Any] | None = None,
                    callbacks: list[dict[str, Any]] | None = None, **sections: Any
                    ) -> dict[str, Any]:
    return tiny_config(imports=[MODULE], trainer={"args": {"rounds": rounds}},
                       learner=learner or {"args": {"lr": 0.05, "batch_size": 32}},
                       callbacks=[{"type": "trace", "args": {"path": str(trace)}},
                                  *(callbacks or [])], **sections)


def misbehaving(**args: Any) -> dict[str, Any]:
    return {"type": "misbehave", "args": {"lr": 0.05, "batch_size": 32, **args}}


# -- the recorder cannot miss a hook ---------------------------------------------------------------


def test_the_recorder_records_every_hook_of_callback(helpers):
    declared = {name for name, _ in inspect.getmembers(Callback, inspect.isfunction)
                if name.startswith("on_")}
    assert declared == set(HOOKS), "HOOKS and Callback's on_* methods disagree"
    assert set(helpers.HOOK_NAMES) == set(HOOKS)
    recorder = helpers.Trace(path="unused")
    assert all(overrides(recorder, hook) for hook in HOOKS)
    for hook in HOOKS:  # every parameter of every hook is recorded
        params = [p for p in inspect.signature(getattr(Callback, hook)).parameters
                  if p not in ("self", "kwargs")]
        assert set(params) <= set(helpers.DESCRIBE), hook


# -- the golden lifecycle ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_golden_lifecycle_is_the_same_on_every_runtime(tmp_path, helpers, runtime_of):
    rounds, epochs = 2, 2
    results, records = {}, {}
    sections = {mode: runtime_of(mode) for mode in RUNTIMES}  # skips at once without Ray
    for mode in RUNTIMES:
        trace = tmp_path / f"{mode}.jsonl"
        config = contract_config(rounds, trace, runtime=sections[mode],
                                 learner={"args": {"lr": 0.05, "batch_size": 32,
                                                   "epochs": epochs}})
        results[mode] = oiafed.run(config, run_dir=tmp_path / mode)
        records[mode] = read(trace)

    # the trainer hooks: one ordered trace, the golden one
    serial = trainer_trace(records["serial"])
    expected: list[tuple] = [("on_train_start", 0)]
    for r in range(1, rounds + 1):
        expected += [("on_round_start", r), ("on_aggregate_start", r), ("on_aggregate_end", r),
                     ("on_round_end", r)]
    expected.append(("on_train_end", rounds))
    assert hooks_of(serial) == expected
    assert [r["updates"] for r in serial if r["hook"] == "on_aggregate_start"] == [CLIENTS] * rounds
    assert serial[-1]["result"] == ["train", rounds, "completed"]
    for mode in RUNTIMES[1:]:
        assert trainer_trace(records[mode]) == serial, mode

    # on_client_join: every client of a deployment as round 1 starts; never elsewhere
    joins = {mode: [(r["trainer"], r["client_id"]) for r in records[mode]
                    if r["hook"] == "on_client_join"] for mode in RUNTIMES}
    assert sorted(joins.pop("grpc")) == [(1, c) for c in CLIENTS]
    assert joins == {"serial": [], "parallel": [], "ray": []}
    grpc_trace = [call[:2] for call in hooks_of(trainer_trace(records["grpc"], joins=True))]
    assert grpc_trace[:2 + len(CLIENTS)] == [("on_train_start", 0), ("on_round_start", 1),
                                             *[("on_client_join", 1)] * len(CLIENTS)]

    # the epoch hooks: the same set per (round, client), where the learners run
    per_client = {("on_epoch_start", e, ()) for e in range(1, epochs + 1)} | {
        ("on_epoch_end", e, ("accuracy", "loss")) for e in range(1, epochs + 1)}
    golden = {(r, c): per_client for r in range(1, rounds + 1) for c in CLIENTS}
    for mode in RUNTIMES:
        assert epoch_calls(records[mode]) == golden, mode
        pids = {r["pid"] for r in records[mode] if r["hook"] in EPOCH_HOOKS}
        assert (pids == {os.getpid()}) if mode == "serial" else (os.getpid() not in pids), mode

    # every hook fired but those of failures; the recorder's hooks are Callback's
    fired = {r["hook"] for mode in RUNTIMES for r in records[mode]}
    assert fired == set(HOOKS) - {"on_client_failure", "on_exception"}
    assert set(HOOKS) <= set(vars(helpers.Trace))

    # the same numbers
    for mode in RUNTIMES[1:]:
        assert_same_history(results[mode].history, results["serial"].history)
    assert no_workers_left()


# -- the failure policy, case by case ------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", runtimes(*RUNTIMES))
def test_training_that_raises_is_a_client_failure_with_its_traceback(
        mode, tmp_path, helpers, runtime_of):
    trace = tmp_path / "trace.jsonl"
    config = contract_config(1, trace, runtime=runtime_of(mode),
                             learner=misbehaving(victim="client_2", fail=True))
    result = oiafed.run(config, run_dir=tmp_path / "run")
    calls = trainer_trace(read(trace))
    assert hooks_of(calls) == [
        ("on_train_start", 0), ("on_round_start", 1), ("on_client_failure", 1, "client_2"),
        ("on_aggregate_start", 1), ("on_aggregate_end", 1), ("on_round_end", 1),
        ("on_train_end", 1)]
    error = calls[2]["error"]
    assert error.startswith("Traceback (most recent call last)")
    assert error.rstrip().splitlines()[-1] == "ValueError: cannot train client_2"
    assert f"{MODULE}.py" in error, "the traceback of where the learner ran"
    assert calls[3]["updates"] == ["client_0", "client_1", "client_3"]
    assert [row["num_clients"] for row in result.history] == [3]
    assert no_workers_left()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", runtimes(*RUNTIMES))
def test_strict_mode_fails_the_run_with_the_traceback(mode, tmp_path, helpers, runtime_of):
    trace = tmp_path / "trace.jsonl"
    config = contract_config(1, trace, runtime=runtime_of(mode), strict=True,
                             learner=misbehaving(victim="client_2", fail=True))
    with pytest.raises(ClientTrainingError) as caught:
        oiafed.run(config, run_dir=tmp_path / "run")
    error = caught.value
    assert (error.client_id, error.round_num) == ("client_2", 1)
    assert error.traceback.startswith("Traceback (most recent call last)")
    assert error.traceback.rstrip().endswith("ValueError: cannot train client_2")
    assert error.traceback.rstrip() in str(error)
    calls = trainer_trace(read(trace))
    assert hooks_of(calls) == [("on_train_start", 0), ("on_round_start", 1),
                               ("on_exception", 1)]
    assert calls[-1]["exception"] == ["ClientTrainingError", str(error)]
    assert no_workers_left()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", runtimes(*RUNTIMES))
def test_a_fit_config_that_is_not_json_fails_the_run(mode, tmp_path, helpers, runtime_of):
    trace = tmp_path / "trace.jsonl"
    config = contract_config(1, trace, runtime=runtime_of(mode),
                             callbacks=[{"type": "poison_fit_config"}])
    with pytest.raises(ConfigError) as caught:
        oiafed.run(config, run_dir=tmp_path / "run")
    assert caught.value.path == "trainer.fit_config"
    assert str(caught.value).startswith("trainer.fit_config: must hold JSON values")
    calls = trainer_trace(read(trace))
    assert hooks_of(calls) == [("on_train_start", 0), ("on_round_start", 1),
                               ("on_exception", 1)]
    assert calls[-1]["exception"] == ["ConfigError", str(caught.value)]
    assert not epoch_calls(read(trace)), "no client trained"
    assert no_workers_left()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", runtimes(*RUNTIMES))
def test_a_client_past_the_round_deadline_fails_and_the_others_count(
        mode, tmp_path, helpers, runtime_of):
    """client_3 (trained last by the serial runtime, which cannot interrupt it: it fails when
    it ends) sleeps 4 s in a round of at most 2 s."""
    trace = tmp_path / "trace.jsonl"
    config = contract_config(1, trace, runtime=runtime_of(mode),
                             learner=misbehaving(victim="client_3", sleep=4.0))
    config["trainer"]["args"]["round_timeout"] = 2.0
    result = oiafed.run(config, run_dir=tmp_path / "run")
    calls = trainer_trace(read(trace))
    assert hooks_of(calls) == [
        ("on_train_start", 0), ("on_round_start", 1), ("on_client_failure", 1, "client_3"),
        ("on_aggregate_start", 1), ("on_aggregate_end", 1), ("on_round_end", 1),
        ("on_train_end", 1)]
    assert "round_timeout=2s" in calls[2]["error"]
    assert calls[3]["updates"] == ["client_0", "client_1", "client_2"]
    assert [row["num_clients"] for row in result.history] == [3]
    assert no_workers_left()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", runtimes("parallel", "ray", "grpc"))
def test_a_dying_worker_is_retried_once_then_its_client_fails(
        mode, tmp_path, helpers, runtime_of):
    """The process training client_1 kills itself every time. A worker process or actor is
    replaced and the client retried once; a deployed client process that dies is a
    disconnection (nothing restarts it). The serial runtime cannot outlive its own process."""
    trace, attempts = tmp_path / "trace.jsonl", tmp_path / "attempts.jsonl"
    config = contract_config(1, trace, runtime=runtime_of(mode),
                             learner=misbehaving(victim="client_1", kill=True,
                                                 attempts=str(attempts)))
    result = oiafed.run(config, run_dir=tmp_path / "run")
    calls = trainer_trace(read(trace))
    assert hooks_of(calls) == [
        ("on_train_start", 0), ("on_round_start", 1), ("on_client_failure", 1, "client_1"),
        ("on_aggregate_start", 1), ("on_aggregate_end", 1), ("on_round_end", 1),
        ("on_train_end", 1)]
    tries = read(attempts)
    if mode == "grpc":
        assert len(tries) == 1
        assert calls[2]["error"] == "disconnected during the round"
    else:
        assert len(tries) == 2 and tries[0]["pid"] != tries[1]["pid"]
        assert "died 2 times" in calls[2]["error"]
    assert [row["num_clients"] for row in result.history] == [3]
    assert no_workers_left()
