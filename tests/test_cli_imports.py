"""``imports`` of user modules, run for real: a module beside the config, one in the working
directory, a ``.py`` path relative to the config's folder; found by ``oiafed run`` started from
another folder without PYTHONPATH, in the run's process and in parallel workers, and again when
the run is resumed from elsewhere. A module found nowhere: exit 2, saying where it looked.

The command runs as the installed ``oiafed`` script does: ``python -P`` puts no working
directory on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

MODULE = """
    import os

    from oiafed import Callback, register


    @register("callback.{name}")
    class Marker(Callback):
        def __init__(self, marker: str) -> None:
            self.marker = marker

        def on_epoch_end(self, learner, epoch, metrics, **kwargs):
            with open(self.marker, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
"""

BASE = {
    "seed": 0,
    "data": {"type": "digits", "num_clients": 3},
    "model": {"type": "logreg"},
    "trainer": {"args": {"rounds": 2}},
    "learner": {"args": {"epochs": 1}},
}


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(NO_COLOR="1", COLUMNS="250", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-P", "-m", "oiafed.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"timed out: {stderr}")
    return proc.returncode, stderr


def config(folder: Path, name: str, imports: list[str], markers: dict[str, Path],
           **runtime: object) -> None:
    data = {**BASE, "name": name, "imports": imports,
            "callbacks": [{"type": kind, "args": {"marker": str(path)}} for kind, path in markers.items()],
            "runtime": {"mode": "serial", **runtime}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def marks(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("imports")
    exp, work = root / "exp", root / "work"  # the config's folder; the working directory
    (exp / "extras").mkdir(parents=True)
    work.mkdir()
    (exp / "beside_cb.py").write_text(textwrap.dedent(MODULE.format(name="beside_test")))
    (exp / "extras/by_path_cb.py").write_text(textwrap.dedent(MODULE.format(name="by_path_test")))
    (work / "in_cwd_cb.py").write_text(textwrap.dedent(MODULE.format(name="in_cwd_test")))
    config(exp, "serial", ["beside_cb"], {"beside_test": root / "serial.marks"})
    config(exp, "parallel", ["beside_cb", "in_cwd_cb"],
           {"beside_test": root / "parallel.marks", "in_cwd_test": root / "parallel_cwd.marks"},
           mode="parallel", workers=2)
    config(exp, "by_path", ["extras/by_path_cb.py"], {"by_path_test": root / "by_path.marks"})
    config(exp, "missing", ["no_such_module_xyz"], {})
    started = {name: start(work, "run", f"../exp/{name}.yaml", "-q", "--run-dir", f"runs/{name}")
               for name in ("serial", "parallel", "by_path", "missing")}
    result: dict[str, object] = {"root": root, "exp": exp, "work": work,
                                 "pids": {name: proc.pid for name, proc in started.items()}}
    result.update({name: finish(proc) for name, proc in started.items()})
    # Resumed from a third folder: the run folder's config.yaml still finds the module.
    result["resumed"] = finish(start(root, "run", "--resume", str(work / "runs/by_path"), "-q",
                                     "trainer.args.rounds=3"))
    return result


def test_a_module_beside_the_config_is_found_from_another_folder(outcomes: dict) -> None:
    code, stderr = outcomes["serial"]
    assert code == 0, stderr
    assert marks(outcomes["root"] / "serial.marks") == [outcomes["pids"]["serial"]] * 6


def test_parallel_workers_find_modules_beside_the_config_and_in_the_working_directory(
        outcomes: dict) -> None:
    code, stderr = outcomes["parallel"]
    assert code == 0, stderr
    for name in ("parallel.marks", "parallel_cwd.marks"):
        pids = marks(outcomes["root"] / name)
        assert len(pids) == 6, name  # 3 clients x 2 rounds x 1 epoch, trained in the workers
        assert outcomes["pids"]["parallel"] not in pids


def test_a_py_path_resolves_against_the_config_folder_and_resumes_from_anywhere(
        outcomes: dict) -> None:
    code, stderr = outcomes["by_path"]
    assert code == 0, stderr
    saved = yaml.safe_load((outcomes["work"] / "runs/by_path/config.yaml").read_text())
    assert saved["imports"] == [str(outcomes["exp"] / "extras/by_path_cb.py")]
    code, stderr = outcomes["resumed"]
    assert code == 0, stderr
    summary = json.loads((outcomes["work"] / "runs/by_path/summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert len(marks(outcomes["root"] / "by_path.marks")) == 9


def test_a_missing_module_exits_2_listing_where_it_looked(outcomes: dict) -> None:
    code, stderr = outcomes["missing"]
    assert code == 2, stderr
    assert stderr.startswith("error: imports[0]: cannot import module 'no_such_module_xyz': "
                             "no module 'no_such_module_xyz' on the Python path"), stderr
    assert f"{outcomes['exp']} (the config's folder)" in stderr
    assert f"{outcomes['work']} (the working directory)" in stderr
    assert not (outcomes["work"] / "runs/missing").exists()
