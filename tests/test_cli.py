"""The ``oiafed`` command, run for real in subprocesses: exit codes, output, the run folder.

Exit codes: 0 ok, 2 bad input (config, arguments, files), 1 failure at run time. Starting a
Python process that imports torch takes seconds, so the independent commands are started
together once per module and each test checks its own command's outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from oiafed.cli import main

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"type": "digits", "num_clients": 3},
    "model": {"type": "logreg"},
    "trainer": {"args": {"rounds": 2}},
    "learner": {"args": {"lr": 0.05, "batch_size": 32}},
}

FAILING_MODULE = """
    from oiafed import Callback, register


    @register("callback.explode_test")
    class Explode(Callback):
        def __init__(self, at=1):
            self.at = at

        async def on_round_end(self, trainer, round_num, result, **kwargs):
            if round_num >= self.at:
                raise RuntimeError(f"boom in round {round_num}")

        async def on_exception(self, trainer, exception, **kwargs):
            with open("on_exception.txt", "a") as f:
                f.write(f"{type(exception).__name__} {trainer.round_num}\\n")
"""


@dataclass
class Outcome:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:  # shown when an assertion about it fails
        return (f"oiafed {' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout}"
                f"\n--- stderr\n{self.stderr}")


def oiafed_command() -> list[str]:
    return [sys.executable, "-m", "oiafed.cli"]


def start(workdir: Path, *args: str) -> tuple[list[str], subprocess.Popen]:
    # One torch thread: on a small shared machine, torch's thread pool makes a tiny run slower.
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([*oiafed_command(), *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return list(args), proc


def finish(started: tuple[list[str], subprocess.Popen]) -> Outcome:
    args, proc = started
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"oiafed {' '.join(args)} timed out\n{stdout}\n{stderr}")
    return Outcome(args, proc.returncode, stdout, stderr)


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    write_yaml(folder / "tiny.yaml", TINY)
    write_yaml(folder / "unknown_key.yaml", {**TINY, "epochs": 3})
    write_yaml(folder / "unknown_type.yaml", {**TINY, "aggregator": {"type": "fedavgg"}})
    write_yaml(folder / "bad_value.yaml", {**TINY, "data": {**TINY["data"], "num_clients": 0}})
    write_yaml(folder / "bad_arg_value.yaml", {**TINY, "trainer": {"args": {"rounds": 0}}})
    # model.type switched from mlp to cnn, the mlp's hidden: [64] left behind
    write_yaml(folder / "switched_model.yaml", {**TINY, "model": {"type": "cnn", "args": {"hidden": [64]}}})
    write_yaml(folder / "broken_import.yaml", {**TINY, "imports": ["cli_broken_module"]})
    (folder / "cli_broken_module.py").write_text("def broken(:\n", encoding="utf-8")
    write_yaml(folder / "failing.yaml", {**TINY, "strict": True, "imports": ["cli_failing_callbacks"],
                                         "callbacks": [{"type": "explode_test"}]})
    write_yaml(folder / "failing_late.yaml",
               {**TINY, "strict": True, "imports": ["cli_failing_callbacks"],
                "trainer": {"args": {"rounds": 3}},
                "callbacks": [{"type": "explode_test", "args": {"at": 2}}]})
    write_yaml(folder / "long.yaml", {**TINY, "trainer": {"args": {"rounds": 100000}}})
    (folder / "cli_failing_callbacks.py").write_text(textwrap.dedent(FAILING_MODULE), encoding="utf-8")
    used = folder / "runs/used"  # an earlier run's folder
    used.mkdir(parents=True)
    for name, text in OLD_RUN.items():
        (used / name).write_text(text, encoding="utf-8")
    return folder


OLD_RUN = {
    "config.yaml": "name: earlier\n",
    "metrics.jsonl": '{"round": 1, "accuracy": 0.5}\n',
    "summary.json": '{"rounds_completed": 1}\n',
    "partition.json": "{}\n",
}


COMMANDS = {
    "run": ["run", "tiny.yaml", "--run-dir", "runs/first"],
    # Options first, the override after them; --quiet prints nothing.
    "run_quiet": ["run", "tiny.yaml", "--quiet", "--run-dir", "runs/quiet", "trainer.args.rounds=3"],
    "run_failing": ["run", "failing.yaml", "--run-dir", "runs/failing"],
    "run_report": ["run", "tiny.yaml", "--run-dir", "runs/report", "report=true"],
    "run_failing_late": ["run", "failing_late.yaml", "--run-dir", "runs/failing_late"],
    "run_used_dir": ["run", "tiny.yaml", "--run-dir", "runs/used"],
    "run_unknown_type": ["run", "unknown_type.yaml", "--run-dir", "runs/unknown_type"],
    "run_bad_override": ["run", "tiny.yaml", "trainer.args.rounds", "--run-dir", "runs/bad_override"],
    "validate": ["validate", "tiny.yaml", "data.num_clients=5"],
    "validate_unknown_key": ["validate", "unknown_key.yaml"],
    "validate_bad_value": ["validate", "bad_value.yaml"],
    "validate_missing_file": ["validate", "missing.yaml"],
    "validate_bad_arg_value": ["validate", "bad_arg_value.yaml"],
    "validate_broken_import": ["validate", "broken_import.yaml"],
    "list": ["list"],
    "list_callback": ["list", "callback"],
    "list_callbacks": ["list", "callbacks"],
    "list_model_cnn": ["list", "model", "cnn"],
    "validate_switched_model": ["validate", "switched_model.yaml"],
}


@pytest.fixture(scope="module")
def outcomes(workdir: Path) -> dict[str, Outcome]:
    started = {name: start(workdir, *args) for name, args in COMMANDS.items()}
    return {name: finish(proc) for name, proc in started.items()}


# -- run ----------------------------------------------------------------------------------------


def test_run_exits_0_and_writes_the_run_folder(workdir: Path, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run"]
    assert outcome.returncode == 0, outcome
    folder = workdir / "runs/first"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "partition.json"} <= {
        p.name for p in folder.iterdir()}

    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["data"]["num_clients"] == 3
    assert config["model"]["type"] == "logreg"
    assert config["trainer"]["args"]["rounds"] == 2

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["num_clients"] == 3

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["stop_reason"] == "completed"
    assert summary["final_metrics"]["round"] == 2

    partition = json.loads((folder / "partition.json").read_text())
    assert partition["num_clients"] == 3
    assert len(partition["clients"]) == 3
    assert sum(c["num_samples"] for c in partition["clients"].values()) == partition["train_samples"]
    assert partition["train_samples"] + partition["test_samples"] == 1797


def test_run_prints_a_line_per_round_and_a_summary(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run"]
    lines = outcome.stdout.splitlines()
    round_lines = [line for line in lines if line.lstrip().startswith("round ")]
    assert len(round_lines) == 2, outcome
    assert "accuracy=" in round_lines[0]
    assert any(line.startswith("done: 2 rounds, completed") for line in lines), outcome
    assert "run folder:" in outcome.stdout


def test_run_prints_where_its_report_is(workdir: Path, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run_report"]
    assert outcome.returncode == 0, outcome
    page = workdir / "runs/report/report.html"
    assert any(line.startswith("report: ") and line.endswith("runs/report/report.html")
               for line in outcome.stdout.splitlines()), outcome
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert "report:" not in outcomes["run"].stdout  # no report asked for: no line


def test_quiet_run_prints_nothing_and_takes_overrides_after_options(
        workdir: Path, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run_quiet"]
    assert outcome.returncode == 0, outcome
    assert outcome.stdout == "", outcome
    assert "round" not in outcome.stderr, outcome
    rows = (workdir / "runs/quiet/metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["round"] for row in rows] == [1, 2, 3]


def test_an_already_used_run_dir_exits_2_and_leaves_the_old_run_alone(
        workdir: Path, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run_used_dir"]
    assert outcome.returncode == 2, outcome
    assert "runs/used already holds a run; choose another --run-dir" in outcome.stderr, outcome
    folder = workdir / "runs/used"
    assert {p.name: p.read_text() for p in folder.iterdir()} == OLD_RUN


def test_failure_at_run_time_exits_1(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run_failing"]
    assert outcome.returncode == 1, outcome
    assert "failed:" in outcome.stderr
    assert "explode_test.on_round_end" in outcome.stderr
    assert "boom in round 1" in outcome.stderr
    assert "error:" not in outcome.stderr  # not reported as bad input


def test_a_failed_run_tells_its_callbacks_keeps_its_last_round_and_says_how_to_resume(
        workdir: Path, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["run_failing_late"]
    assert outcome.returncode == 1, outcome
    assert "boom in round 2" in outcome.stderr
    assert "--resume" in outcome.stderr and "runs/failing_late" in outcome.stderr
    assert "CallbackError 2" in (workdir / "on_exception.txt").read_text()
    folder = workdir / "runs/failing_late"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stop_reason"].startswith("failed: CallbackError")
    assert summary["rounds_completed"] == 1
    from oiafed.state import load_state

    assert load_state(folder)["trainer"]["round_num"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["serial", "parallel", "grpc"])
def test_ctrl_c_stops_a_run_within_a_round_and_exits_130(workdir: Path, mode: str) -> None:
    import signal
    import time

    folder = workdir / f"runs/long_{mode}"
    args, proc = start(workdir, "run", "long.yaml", f"runtime.mode={mode}", "--run-dir",
                       str(folder), "-q")
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, finish((args, proc))
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    outcome = finish((args, proc))
    assert time.monotonic() - sent < 10, "one Ctrl-C stops the run within a round or so"
    assert outcome.returncode == 130, outcome
    assert "interrupted" in outcome.stderr and "--resume" in outcome.stderr
    assert "Warning" not in outcome.stderr  # e.g. runpy's, from processes forked for the run
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    assert 2 <= summary["rounds_completed"] < 1000
    from oiafed.state import load_state

    assert load_state(folder)["trainer"]["round_num"] == summary["rounds_completed"]


@pytest.mark.parametrize(("name", "message"), [
    ("run_unknown_type", "aggregator.type: unknown aggregator 'fedavgg'. Did you mean 'fedavg'? "
                         "Known aggregators: ditto, fedadagrad, fedadam, fedavg, "),
    ("run_bad_override", "override 'trainer.args.rounds' must look like key.path=value"),
    ("validate_unknown_key", "epochs: unknown key"),
    ("validate_bad_value", "data.num_clients: Input should be greater than or equal to 1"),
    ("validate_missing_file", "cannot read config file missing.yaml"),
    ("validate_bad_arg_value", "trainer.args: rounds must be >= 1, got 0"),
    ("validate_broken_import", "imports[0]: cannot import module 'cli_broken_module': SyntaxError"),
    ("validate_switched_model", "model.args.hidden: cnn's argument hidden expects int, got [64]: "
                                "Input should be a valid integer"),
])
def test_bad_input_exits_2_with_a_message(workdir: Path, outcomes: dict[str, Outcome], name: str,
                                          message: str) -> None:
    outcome = outcomes[name]
    assert outcome.returncode == 2, outcome
    assert outcome.stderr.startswith("error: "), outcome
    assert message in outcome.stderr, outcome
    assert "Traceback" not in outcome.stderr
    assert outcome.stdout == ""
    if "--run-dir" in COMMANDS[name]:  # nothing is written for a run that cannot start
        run_dir = COMMANDS[name][COMMANDS[name].index("--run-dir") + 1]
        assert not (workdir / run_dir).exists()


# -- validate -----------------------------------------------------------------------------------


def test_validate_exits_0_for_a_good_config_with_overrides(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["validate"]
    assert outcome.returncode == 0, outcome
    assert "tiny.yaml: valid (tiny, 5 clients, 0 callbacks)" in outcome.stdout


# -- list ---------------------------------------------------------------------------------------


def test_list_prints_every_kind_and_the_builtins(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["list"]
    assert outcome.returncode == 0, outcome
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in outcome.stdout.splitlines()}
    assert set(lines) == {"callback", "aggregator", "learner", "trainer", "model", "dataset",
                          "partitioner", "attack", "privacy"}
    assert {n.strip() for n in lines["privacy"].split(",")} == {"central", "local"}
    assert "fedavg" in lines["aggregator"]
    assert {"cnn", "logreg", "mlp"} <= {n.strip() for n in lines["model"].split(",")}
    assert {"iid", "dirichlet", "shards", "quantity"} <= {n.strip() for n in lines["partitioner"].split(",")}


def test_list_callback_prints_only_callbacks(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["list_callback"]
    assert outcome.returncode == 0, outcome
    assert outcome.stdout.startswith("callback: ")
    assert len(outcome.stdout.strip().splitlines()) == 1
    assert "progress" in outcome.stdout
    assert "fedavg" not in outcome.stdout


def test_list_takes_plural_kinds(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["list_callbacks"]
    assert outcome.returncode == 0, outcome
    assert outcome.stdout == outcomes["list_callback"].stdout


def test_list_kind_name_prints_the_arguments_with_types_defaults_and_docstring(
        outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["list_model_cnn"]
    assert outcome.returncode == 0, outcome
    assert outcome.stdout.splitlines() == [
        "model cnn: Small CNN: per entry of ``channels`` a 3x3 conv, ReLU and 2x2 max-pool, "
        "then an MLP head.",
        "  channels: Sequence[int] = [32, 64]",
        "  hidden: int = 128",
        "  set by oiafed: input_shape, num_classes",
    ]


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    import oiafed

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"oiafed {oiafed.__version__}\n"


# -- argument errors (argparse stops before anything runs: checked in-process) -----------------


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "tiny.yaml", "--rounds", "2"], "unrecognized arguments: --rounds 2"),
    (["list", "gadget"], "invalid choice: 'gadget'"),
    (["list", "model", "seed=1"], "unrecognized arguments: seed=1"),
    ([], "the following arguments are required: command"),
])
def test_bad_arguments_exit_2_with_usage(capsys: pytest.CaptureFixture[str], argv: list[str],
                                         message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: oiafed")
    assert message in err
