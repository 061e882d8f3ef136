"""``oiafed sweep``: cells that are solo runs, a killed sweep resumed, the summary over seeds,
bad input refused before anything is written, cells on a Ray cluster."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
import yaml

import oiafed
from oiafed.cli import main
from oiafed.reporting.runs import RunRecord
from oiafed.sweep.execute import RoundCounter, cell_environment, usable_cpus
from oiafed.sweep.grid import Cell
from oiafed.sweep.summary import summarize_points, write_summary
from support import SLOW_ROUNDS, without_timing

ROOT = Path(__file__).resolve().parents[1]
LRS = ("0.05", "0.1")
SEEDS = (0, 1)


def quickstart(rounds: int, **extra: Any) -> dict[str, Any]:
    """The quickstart config with ``rounds`` rounds and ``extra`` top-level keys."""
    config = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    config["trainer"]["args"]["rounds"] = rounds
    return {**config, **extra}


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    file = folder / "config.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def sweep_command(config_file: Path, sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "oiafed.cli", "sweep", str(config_file),
            "--set", f"learner.args.lr={','.join(LRS)}", "--seeds", ",".join(map(str, SEEDS)),
            "--jobs", "2", "--metric", "accuracy", "--target", "0.5",
            "--sweep-dir", str(sweep_dir), "-q"]


def cell_dirs(sweep_dir: Path) -> dict[tuple[str, int], Path]:
    return {(lr, seed): sweep_dir / f"learner.args.lr={lr}" / f"seed={seed}"
            for lr in LRS for seed in SEEDS}


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's complete ``metrics.jsonl`` lines (not one being written)."""
    file = run_dir / "metrics.jsonl"
    lines = file.read_text().split("\n")[:-1] if file.exists() else []
    return [json.loads(line) for line in lines]


def files_of(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in run_dir.rglob("*") if f.is_file()}


def solo_run(config_file: Path, run_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """A solo run of a cell's config in this process, with one torch thread (as the cells,
    started with OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return oiafed.run(config_file, run_dir=run_dir, overrides=overrides).history
    finally:
        torch.set_num_threads(threads)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def lock_free(sweep_dir: Path) -> bool:
    """Whether no process holds the sweep folder's lock."""
    with open(sweep_dir / ".lock") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


@dataclass
class KilledSweep:
    """A 2 x 2 sweep SIGKILLed while a cell was half done, then run again to its end."""

    config_file: Path
    sweep_dir: Path
    cells: dict[tuple[str, int], Path]
    finished: dict[Path, dict[str, tuple[int, bytes]]]
    """The cells finished before the kill, with their files (mtime, bytes) then."""
    interrupted: list[Path]
    rounds_after_kill: dict[Path, tuple[int, int]]
    """An interrupted cell's rounds recorded at the kill and 0.8 s later."""
    again: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilledSweep]:
    """2 learning rates x 2 seeds of the quickstart (2 rounds, 0.3 s after each), 2 cells at
    a time, in an ``oiafed sweep`` process SIGKILLed once a cell has finished and another has
    recorded 1 of its 2 rounds; then the same command again."""
    folder = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))  # slow_rounds, for the solo runs of the tests
        (folder / "slow_rounds.py").write_text(SLOW_ROUNDS)
        config = quickstart(2, imports=["slow_rounds"],
                            callbacks=[{"type": "slow_rounds", "args": {"seconds": 0.3}}])
        config_file = write_config(folder, config)
        sweep_dir = folder / "sweep"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
        cells = cell_dirs(sweep_dir)
        process = subprocess.Popen(sweep_command(config_file, sweep_dir), env=env, cwd=folder)

        def done() -> list[Path]:
            return [d for d in cells.values() if (d / "summary.json").exists()]

        def half() -> list[Path]:
            return [d for d in cells.values() if d not in done() and len(rows(d)) == 1]

        wait_for(lambda: bool(done() and half()))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        finished = {d: files_of(d) for d in done()}
        interrupted = half()
        at_kill = {d: len(rows(d)) for d in interrupted}
        time.sleep(0.8)  # a cell still running would record its next round (0.3 s a round)
        later = {d: (at_kill[d], len(rows(d))) for d in interrupted}
        wait_for(lambda: lock_free(sweep_dir))  # cells still stopping hold the sweep's lock
        again = subprocess.run(sweep_command(config_file, sweep_dir), env=env, cwd=folder,
                               capture_output=True, text=True, timeout=300)
        yield KilledSweep(config_file, sweep_dir, cells, finished, interrupted,
                          later, again)


@pytest.fixture
def slow_rounds(clean_registry: None) -> Iterator[None]:
    """The ``slow_rounds`` module imported afresh by the test and forgotten after it (its
    registration goes with the registry's snapshot)."""
    sys.modules.pop("slow_rounds", None)
    yield
    sys.modules.pop("slow_rounds", None)


def test_a_killed_sweep_run_again_skips_finished_cells_and_resumes_the_others(killed_sweep):
    """No cell outlives the killed sweep; run again, it ends every cell and leaves the
    finished ones' files as they were."""
    sweep = killed_sweep
    assert sweep.again.returncode == 0, sweep.again.stdout + sweep.again.stderr
    assert sweep.finished and sweep.interrupted
    assert len(sweep.finished) < len(sweep.cells)
    for at_kill, later in sweep.rounds_after_kill.values():
        assert at_kill == later == 1
    assert {d: files_of(d) for d in sweep.finished} == sweep.finished
    for run_dir in sweep.cells.values():
        assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "completed"
    recorded = json.loads((sweep.sweep_dir / "sweep.json").read_text())["cells"]
    assert sorted(c["folder"] for c in recorded) == sorted(
        str(d.relative_to(sweep.sweep_dir)) for d in sweep.cells.values())


def test_every_cell_has_the_metrics_of_its_solo_run(killed_sweep, tmp_path, slow_rounds):
    """Cells run 2 at a time, one of them killed and resumed, give the history of a solo
    ``oiafed.run`` of the cell's config."""
    for (lr, seed), run_dir in killed_sweep.cells.items():
        solo = solo_run(killed_sweep.config_file, tmp_path / f"{lr}-{seed}",
                        [f"learner.args.lr={lr}", f"seed={seed}", "callbacks.0.args.seconds=0"])
        assert without_timing(rows(run_dir)) == without_timing(solo), (lr, seed)


def test_the_summary_holds_mean_and_std_over_seeds(killed_sweep):
    check_summary(killed_sweep.sweep_dir, killed_sweep.cells, target=0.5)


def check_summary(sweep_dir: Path, cells: dict[tuple[str, int], Path], target: float) -> None:
    """summary.csv against the cells' metrics files; summary.md and the plots exist."""
    lines = (sweep_dir / "summary.csv").read_text().splitlines()
    header = lines[0].split(",")
    table = {row[0]: dict(zip(header, row, strict=True)) for row in
             (line.split(",") for line in lines[1:])}
    assert sorted(table) == sorted(LRS)
    for lr in LRS:
        accuracies = [[row["accuracy"] for row in rows(cells[lr, seed])] for seed in SEEDS]
        best = [max(a) for a in accuracies]
        final = [a[-1] for a in accuracies]
        reached = [next(i + 1 for i, v in enumerate(a) if v >= target) for a in accuracies
                   if max(a) >= target]
        got = table[lr]
        assert int(got["seeds"]) == len(SEEDS)
        assert float(got["best_accuracy_mean"]) == pytest.approx(statistics.mean(best))
        assert float(got["best_accuracy_std"]) == pytest.approx(statistics.stdev(best))
        assert float(got["final_accuracy_mean"]) == pytest.approx(statistics.mean(final))
        assert float(got["final_accuracy_std"]) == pytest.approx(statistics.stdev(final))
        assert int(got["reached_target"]) == len(reached)
        if reached:
            assert float(got["rounds_to_target_mean"]) == pytest.approx(statistics.mean(reached))
    markdown = (sweep_dir / "summary.md").read_text()
    assert "| learner.args.lr | seeds | best accuracy |" in markdown
    for lr in LRS:
        mean = statistics.mean(max(r["accuracy"] for r in rows(cells[lr, s])) for s in SEEDS)
        assert f"| {lr} | 2/2 | {mean:.4f} ± " in markdown
    for metric in ("accuracy", "loss"):
        image = matplotlib.image.imread(sweep_dir / "plots" / f"{metric}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100


BAD = [
    (["--set", "learner.args.lrr=0.1,0.2"], "learner.args.lrr"),
    (["--set", "learner.args.lr=0.1,-1"], "learner.args.lr=-1"),
    (["--set", "trainer.args.rounds=2,two"], "trainer.args.rounds=two"),
    (["--set", "nothing.here=1"], "nothing.here"),
    (["--set", "seed=1,2"], "--seeds"),
    (["--set", "learner.args.lr=0.1", "--set", "learner.args.lr=0.2"], "learner.args.lr"),
    (["--set", "learner.args.lr=0.1,"], "empty value"),
    (["--seeds", "0,x"], "--seeds"),
    (["--jobs", "0"], "--jobs"),
    # found only once a grid point's model or data is built
    (["aggregator.type=fedper", "--set", "aggregator.args.head=head,classifer"],
     "aggregator.args.head=classifer/seed=42: aggregator.args.head: the model"),
    (["--set", "data.local_test_fraction=0.2,0.99"],
     "data.local_test_fraction=0.99/seed=42: data.local_test_fraction: client_"),
]


@pytest.mark.parametrize(("options", "named"), BAD)
def test_bad_sweep_input_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, options,
                                                                    named):
    config_file = write_config(tmp_path, quickstart(2, output_dir=str(tmp_path / "runs")))
    code = main(["sweep", str(config_file), *options, "--sweep-dir", str(tmp_path / "sweep")])
    assert code == 2
    assert named in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_sweep_folder_in_use_is_refused_and_nothing_is_written(tmp_path, capsys):
    """Another sweep holds the folder's lock (here: this process): exit 2 naming the folder."""
    config_file = write_config(tmp_path, quickstart(1))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    with open(sweep_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["sweep", str(config_file), "--set", "learner.args.lr=0.1",
                     "--sweep-dir", str(sweep_dir)])
    assert code == 2
    assert f"another sweep is running in {sweep_dir}" in capsys.readouterr().err
    assert [p.name for p in sweep_dir.iterdir()] == [".lock"]


def test_cells_share_the_cpus_unless_omp_num_threads_is_set():
    cpus = usable_cpus()
    assert cell_environment(2, {"PATH": "/bin"}) == {
        "PATH": "/bin", "OMP_NUM_THREADS": str(max(1, cpus // 2))}
    assert cell_environment(cpus + 1, {})["OMP_NUM_THREADS"] == "1"
    assert cell_environment(1, {"OMP_NUM_THREADS": "3"}) == {"OMP_NUM_THREADS": "3"}


def test_the_round_counter_reads_what_was_appended_and_a_replaced_file_again(tmp_path):
    file = tmp_path / "metrics.jsonl"
    counter = RoundCounter(tmp_path)
    assert counter.count() == 0
    file.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert counter.count() == 2
    with open(file, "a") as handle:
        handle.write('nd": 3}\n')
    assert counter.count() == 3
    replaced = tmp_path / "new"
    replaced.write_text('{"round": 1}\n')
    replaced.replace(file)  # as a resumed run rewrites it
    assert counter.count() == 1


def test_a_metric_no_run_of_a_point_recorded_is_marked_in_the_summary(tmp_path):
    """Points whose runs lack the metric say so; the others are summed up."""
    def run(name: str, values: list[float]) -> RunRecord:
        rounds = [{"round": i, "accuracy": 0.5, **({"personal_accuracy": v} if v else {})}
                  for i, v in enumerate(values, start=1)]
        return RunRecord(path=tmp_path / name, config={}, config_text="", rounds=rounds)

    cells = [Cell((("k", "a"),), 0), Cell((("k", "a"),), 1), Cell((("k", "b"),), 0)]
    records = dict(zip(cells, [run("a0", [0.2, 0.4]), run("a1", [0.6, 0.3]),
                               run("b0", [0, 0])], strict=True))
    points = summarize_points(cells, records, "personal_accuracy", None, None)
    write_summary(tmp_path, ["k"], points, 2, "personal_accuracy", None)
    markdown = (tmp_path / "summary.md").read_text()
    assert "personal_accuracy of the clients' personal models on their local test sets" in markdown
    assert f"| a | 2/2 | 0.5000 ± {statistics.stdev([0.4, 0.6]):.4f} | 0.3500 ± " in markdown
    assert "| b | 1/2 | no such metric | no such metric |" in markdown
    assert (tmp_path / "summary.csv").read_text().splitlines()[2] == "b,1,,,,"


def test_a_sweep_folder_refuses_another_config_or_other_keys_and_sums_up_a_subset(
        killed_sweep, tmp_path, capsys, slow_rounds):
    """Another base config or other keys: exit 2 naming what differs, sweep.json unchanged;
    a sub-grid runs nothing and sums up only itself."""
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(killed_sweep.sweep_dir, sweep_dir)
    record = (sweep_dir / "sweep.json").read_bytes()
    cell = sweep_dir / "learner.args.lr=0.05" / "seed=1"
    files = files_of(cell)
    command = ["sweep", str(killed_sweep.config_file), "--sweep-dir", str(sweep_dir),
               "--seeds", "0,1"]

    assert main([*command, "--set", "learner.args.lr=0.05", "learner.args.epochs=1"]) == 2
    assert "learner.args.epochs" in capsys.readouterr().err
    assert main([*command, "--set", "learner.args.momentum=0.5"]) == 2
    assert "learner.args.momentum" in capsys.readouterr().err
    assert main([*command, "--set", "learner.args.lr=0.05", "--metric", "acuracy"]) == 2
    assert "--metric: no cell that finished recorded the metric 'acuracy'" in \
        capsys.readouterr().err
    assert (sweep_dir / "sweep.json").read_bytes() == record

    assert main(["sweep", str(killed_sweep.config_file), "--sweep-dir", str(sweep_dir),
                 "--seeds", "1", "--set", "learner.args.lr=0.05", "--metric", "loss"]) == 0
    assert files_of(cell) == files
    lines = (sweep_dir / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("learner.args.lr,seeds,best_loss_mean,best_loss_std")
    losses = [row["loss"] for row in rows(cell)]
    assert lines[1:] == [f"0.05,1,{min(losses)},,{losses[-1]},"]


@pytest.mark.slow
def test_cells_run_as_ray_tasks_give_the_solo_runs_metrics(tmp_path, monkeypatch):
    """``--ray local``: a local Ray cluster started for the sweep runs the cell (as a Ray
    task, in a worker process); its metrics are those of a solo run."""
    ray = pytest.importorskip("ray")
    config_file = write_config(tmp_path, quickstart(2))
    sweep_dir = tmp_path / "sweep"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["sweep", str(config_file), "--set", "learner.args.lr=0.1", "--seeds", "1",
                 "--ray", "local", "--sweep-dir", str(sweep_dir), "-q"]) == 0
    assert not ray.is_initialized()  # the sweep's own cluster is shut down
    run_dir = sweep_dir / "learner.args.lr=0.1" / "seed=1"
    solo = solo_run(config_file, tmp_path / "solo", ["learner.args.lr=0.1", "seed=1"])
    assert without_timing(rows(run_dir)) == without_timing(solo)
