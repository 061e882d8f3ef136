"""What a run folder records besides the rounds' metrics: run.log, clients.jsonl, the resolved
config, uniform file permissions; how a run that cannot start or write its folder ends; the
resume of a run stopped before its first save. Runs for real (the CLI in subprocesses)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import oiafed
from oiafed import Callback, CallbackError
from oiafed.config import load_config
from oiafed.core.learner import Learner
from oiafed.registry import register
from oiafed.run_folder import RunLog
from support import Interrupt, RegistrySnapshot, tiny_config, without_timing

TINY = {"name": "tiny", "seed": 0, "data": {"type": "digits", "num_clients": 3},
        "model": {"type": "logreg"}, "trainer": {"args": {"rounds": 2}},
        "learner": {"args": {"lr": 0.05, "batch_size": 32}}}

LONG = "x" * 150  # an error message longer than any terminal's default width

EXPLODE_MODULE = f"""
    from oiafed import Callback, register


    @register("callback.explode_long")
    class ExplodeLong(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            raise RuntimeError(f"boom in round {{round_num}} {LONG}")
"""


def start(workdir: Path, *args: str) -> tuple[list[str], subprocess.Popen]:
    # No terminal and no COLUMNS: what a CI job or `> out.txt 2>&1` sees.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    env.update(NO_COLOR="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "oiafed.cli", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return list(args), proc


COMMANDS = {
    "errors": ["run", "errors.yaml", "--run-dir", "runs/errors"],
    "output_dir_under_a_file": ["run", "tiny.yaml", "output_dir=a_file/runs"],
    "run_dir_under_a_file": ["run", "tiny.yaml", "--run-dir", "a_file/run"],
    "resume_no_state": ["run", "--resume", "runs/no_state", "-q"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("records")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    (folder / "errors.yaml").write_text(yaml.safe_dump(
        {**TINY, "imports": ["cli_explode_long"], "callbacks": [{"type": "explode_long"}]}),
        encoding="utf-8")
    (folder / "cli_explode_long.py").write_text(textwrap.dedent(EXPLODE_MODULE), encoding="utf-8")
    (folder / "a_file").write_text("not a folder\n", encoding="utf-8")
    no_state = folder / "runs/no_state"  # a run killed while it started: its config only
    no_state.mkdir(parents=True)
    (no_state / "config.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return folder


SCRIPT = """
import oiafed, yaml
oiafed.run(yaml.safe_load(open("errors.yaml")), run_dir="runs/script")
"""


@pytest.fixture(scope="module")
def outcomes(workdir: Path) -> dict[str, subprocess.CompletedProcess]:
    started = {name: start(workdir, *args) for name, args in COMMANDS.items()}
    started["script"] = (["-c"], subprocess.Popen(  # Python, no logging configured
        [sys.executable, "-c", SCRIPT], cwd=workdir, env={**os.environ, "PYTHONPATH": str(workdir)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = {}
    for name, (args, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=180)
        done[name] = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    return done


def test_callback_errors_are_one_console_line_each_with_tracebacks_in_run_log(
        workdir: Path, outcomes: dict[str, subprocess.CompletedProcess]) -> None:
    outcome = outcomes["errors"]
    assert outcome.returncode == 0, outcome
    folder = workdir / "runs/errors"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    error_lines = [line for line in outcome.stderr.splitlines() if "explode_long" in line]
    assert len(error_lines) == 2, outcome.stderr
    for round_num, line in enumerate(error_lines, 1):
        assert f"RuntimeError: boom in round {round_num} {LONG}" in line
        assert str(folder / "run.log") in line
    assert len(outcome.stderr.splitlines()) == 2, outcome.stderr
    assert f"2 callback error(s); tracebacks in {folder / 'run.log'}" in outcome.stdout

    log = (folder / "run.log").read_text(encoding="utf-8")
    assert log.count("Traceback (most recent call last)") == 2
    assert log.count("explode_long.on_round_end failed") == 2
    assert f"RuntimeError: boom in round 2 {LONG}\n" in log  # full width, not wrapped

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["callback_errors"] == {"total": 2,
                                          "by_callback": {"explode_long.on_round_end": 2}}


def test_a_script_without_logging_configured_still_sees_errors_on_stderr(
        workdir: Path, outcomes: dict[str, subprocess.CompletedProcess]) -> None:
    outcome = outcomes["script"]
    assert outcome.returncode == 0, outcome
    assert outcome.stderr.count("explode_long.on_round_end failed") == 2, outcome.stderr
    assert outcome.stderr.count("Traceback") == 2, outcome.stderr
    assert (workdir / "runs/script/run.log").read_text().count("Traceback") == 2


@pytest.mark.parametrize("name", ["output_dir_under_a_file", "run_dir_under_a_file"])
def test_a_run_folder_that_cannot_be_written_is_a_one_line_error(
        outcomes: dict[str, subprocess.CompletedProcess], name: str) -> None:
    outcome = outcomes[name]
    assert outcome.returncode == 2, outcome
    assert outcome.stderr.startswith("error: cannot write the run folder a_file/"), outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
    assert "Traceback" not in outcome.stderr


def test_resume_of_a_run_without_state_starts_it_again_in_place(
        workdir: Path, outcomes: dict[str, subprocess.CompletedProcess]) -> None:
    outcome = outcomes["resume_no_state"]
    assert outcome.returncode == 0, outcome
    folder = workdir / "runs/no_state"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert (folder / "state.safetensors").is_file()
    assert json.loads((folder / "summary.json").read_text())["stop_reason"] == "completed"


def test_a_run_stopped_before_its_first_save_resumes_to_the_uninterrupted_result(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 4, "clients_per_round": 2}},
                         runtime={"checkpoint_every": 2, "checkpoint_interval": 0})
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # ends in round 2: round 1 recorded, nothing saved
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(2)])
    assert not (tmp_path / "cut" / "state.safetensors").exists()
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert without_timing(resumed.history) == without_timing(whole.history)
    for key, tensor in whole.weights.items():
        assert (resumed.weights[key] == tensor).all()
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["round"] for row in rows] == [1, 2, 3, 4]


class FailAtStart(Callback):
    async def on_train_start(self, trainer, **kwargs):
        raise RuntimeError("cannot start")


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_that_fails_before_its_first_round_leaves_no_folder_in_the_way(tmp_path, existing):
    run_dir = tmp_path / "run"
    if existing:
        run_dir.mkdir()  # made by the user: kept, emptied of what the run wrote
    with pytest.raises(CallbackError, match="cannot start"):
        oiafed.run(tiny_config(strict=True), run_dir=run_dir, callbacks=[FailAtStart()])
    assert run_dir.exists() == existing
    assert not existing or list(run_dir.iterdir()) == []
    result = oiafed.run(tiny_config(), run_dir=run_dir)  # the same --run-dir works now
    assert result.rounds_completed == 3


def test_a_run_that_fails_later_keeps_its_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(tiny_config(), run_dir=tmp_path / "run", callbacks=[Interrupt(2)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert "the run ended: interrupted" in (tmp_path / "run" / "run.log").read_text()


class FlakyLearner(Learner):
    async def fit(self, client_id, *args, **kwargs):
        if client_id == "client_1":
            raise ValueError(f"no data for {client_id}")
        return await super().fit(client_id, *args, **kwargs)


def test_clients_jsonl_has_a_row_per_sampled_client_and_round(tmp_path):
    seen: dict[int, list] = {}

    class Grab(Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            seen[round_num] = result.updates

    with RegistrySnapshot():
        register("learner.flaky_records_test")(FlakyLearner)
        config = tiny_config(trainer={"args": {"rounds": 3, "clients_per_round": 3}},
                             learner={"type": "flaky_records_test", "args": {"lr": 0.05}})
        oiafed.run(config, run_dir=tmp_path / "run", callbacks=[Grab()])
        assert not [h for h in logging.getLogger("oiafed").handlers if isinstance(h, RunLog)]

    rows = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for round_num, updates in seen.items():
        ok = [row for row in rows if row["round"] == round_num and "error" not in row]
        assert [row["client_id"] for row in ok] == [u.client_id for u in updates]
        for row, update in zip(ok, updates, strict=True):
            assert row["num_samples"] == update.num_samples > 0
            assert row["accuracy"] == update.metrics["accuracy"]
            assert row["loss"] == update.metrics["loss"]
            assert row["time"] == update.metrics["time"] > 0
    failed = [row for row in rows if "error" in row]
    assert failed and all(row["client_id"] == "client_1" for row in failed)
    assert failed[0]["error"] == "ValueError: no data for client_1"
    log = (tmp_path / "run" / "run.log").read_text()
    assert "left out client_1: ValueError: no data for client_1" in log
    assert "\n  | Traceback (most recent call last)" in log  # the failure's own lines, marked
    assert not [line for line in log.splitlines() if line.startswith("Traceback")]


def test_resume_drops_the_client_rows_of_rounds_it_redoes(tmp_path):
    config = tiny_config(data={"type": "digits", "num_clients": 6},
                         trainer={"args": {"rounds": 5, "clients_per_round": 3}},
                         runtime={"checkpoint_interval": 0})
    oiafed.run(config, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # round 4's clients recorded, its state not saved
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(4)])
    cut = tmp_path / "cut" / "clients.jsonl"
    assert [json.loads(line)["round"] for line in cut.read_text().splitlines()][-1] == 4
    with open(cut, "a") as handle:
        handle.write('{"round": 4, "client_id": "cli')  # a line cut short by a kill
    oiafed.run(None, resume=tmp_path / "cut")

    def clients(folder):
        return [(row["round"], row["client_id"], row["num_samples"], row["loss"])
                for row in map(json.loads, (folder / "clients.jsonl").read_text().splitlines())]

    assert clients(tmp_path / "cut") == clients(tmp_path / "whole")
    assert len(clients(tmp_path / "cut")) == 15


def test_every_file_of_a_run_folder_gets_the_same_permissions(tmp_path):
    oiafed.run(tiny_config(), run_dir=tmp_path / "run")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "summary.json", "partition.json", "metrics.jsonl", "clients.jsonl",
            "run.log", "state.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_config_yaml_holds_every_argument_and_gives_the_same_run(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 2, "clients_per_round": 2}},
                         callbacks=[{"type": "early_stopping", "args": {"patience": 5}}])
    first = oiafed.run(config, run_dir=tmp_path / "first")
    written = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert written["trainer"]["args"] == {"rounds": 2, "clients_per_round": 2, "fraction": None,
                                          "eval_every": 1, "min_clients": 1,
                                          "round_timeout": None, "straggler_fraction": 0.0,
                                          "max_update_norm_ratio": 1000.0,
                                          "personal_eval_clients": None}
    assert written["learner"]["args"]["lr"] == 0.05  # the user's value
    assert written["learner"]["args"]["momentum"] == 0.0  # a default
    assert written["aggregator"]["args"] == {"weighted": True, "drop_stragglers": False}
    assert written["callbacks"][0]["args"]["patience"] == 5
    assert written["callbacks"][0]["args"]["metric"] == "accuracy"
    assert "seed" not in written["data"]["args"]  # set by oiafed, never by a config

    load_config(tmp_path / "first" / "config.yaml")  # it validates
    again = oiafed.run(tmp_path / "first" / "config.yaml", run_dir=tmp_path / "again")
    assert without_timing(again.history) == without_timing(first.history)
    # A resume given the config as the user wrote it matches the folder's fuller one.
    resumed = oiafed.run(config, resume=tmp_path / "first")
    assert resumed.rounds_completed == 2
