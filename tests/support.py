"""Small configs and helpers shared by the tests."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import oiafed
from oiafed import Callback, TrainResult, registry

# Peak RSS of the running process in bytes, as source for scripts run in a subprocess. Not
# ``getrusage(...).ru_maxrss``: Linux keeps it across ``execve``, so a child spawned (vfork) by a
# large pytest process reports the parent's peak. ``VmHWM`` belongs to the child's own memory.
PEAK_RSS = ("int(next(line for line in open('/proc/self/status') "
            "if line.startswith('VmHWM:')).split()[1]) * 1024")


def tiny_config(**sections: Any) -> dict[str, Any]:
    """A fast experiment: digits, 4 IID clients, logistic regression, 3 rounds."""
    config: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"type": "digits", "num_clients": 4},
        "model": {"type": "logreg"},
        "trainer": {"args": {"rounds": 3}},
        "learner": {"args": {"lr": 0.05, "batch_size": 32}},
    }
    for key, value in sections.items():
        config[key] = copy.deepcopy(value)
    return config


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows without wall-clock fields (which differ between identical runs)."""
    return [{k: v for k, v in row.items() if k not in ("round_time", "personal_eval_time")}
            for row in history]


class RegistrySnapshot:
    """Restores the registry on exit, so a test may register or override names freely."""

    def __enter__(self) -> RegistrySnapshot:
        registry.load_builtins()
        self._by_name = dict(registry._by_name)
        self._name_by_obj = dict(registry._name_by_obj)
        return self

    def __exit__(self, *exc: object) -> None:
        registry._by_name.clear()
        registry._by_name.update(self._by_name)
        registry._name_by_obj.clear()
        registry._name_by_obj.update(self._name_by_obj)


class Recorder(Callback):
    """Records every hook with the arguments that identify the call."""

    def __init__(self) -> None:
        self.trace: list[tuple] = []

    async def on_train_start(self, trainer, **kwargs):
        self.trace.append(("on_train_start",))

    async def on_train_end(self, trainer, result, **kwargs):
        self.trace.append(("on_train_end", result.rounds_completed))

    async def on_round_start(self, trainer, round_num, **kwargs):
        self.trace.append(("on_round_start", round_num))

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        self.trace.append(("on_round_end", round_num, result.round_num))

    async def on_epoch_start(self, learner, epoch, **kwargs):
        self.trace.append(("on_epoch_start", learner.client_id, epoch))

    async def on_epoch_end(self, learner, epoch, metrics, **kwargs):
        self.trace.append(("on_epoch_end", learner.client_id, epoch, sorted(metrics)))

    async def on_aggregate_start(self, trainer, updates, **kwargs):
        self.trace.append(("on_aggregate_start", [u.client_id for u in updates]))

    async def on_aggregate_end(self, trainer, weights, **kwargs):
        self.trace.append(("on_aggregate_end", sorted(weights)))

    async def on_client_failure(self, trainer, client_id, error, **kwargs):
        self.trace.append(("on_client_failure", client_id, error))


class Interrupt(Callback):
    """A crash (Ctrl-C) at the end of ``round_num``, after the callbacks before it ran."""

    def __init__(self, round_num: int) -> None:
        self.round_num = round_num

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        if round_num == self.round_num:
            raise KeyboardInterrupt


@contextmanager
def module_folder(folder: Path, name: str, source: str) -> Iterator[Path]:
    """Write module ``name`` into ``folder`` and put the folder on ``sys.path`` and
    ``$PYTHONPATH`` (worker and client processes import it too) while the block runs."""
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        patch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        yield folder


SLOW_ROUNDS = textwrap.dedent('''
    import time
    from oiafed import Callback, register

    @register("callback.slow_rounds")
    class SlowRounds(Callback):
        """Gives a test time to kill the run between rounds."""

        def __init__(self, seconds: float = 0.3):
            self.seconds = seconds

        async def on_round_end(self, trainer, round_num, result, **kwargs):
            time.sleep(self.seconds)
''')


def kill_and_resume(tmp_path: Path, config: dict[str, Any], after_rounds: int = 3
                    ) -> tuple[list[dict[str, Any]], TrainResult]:
    """Run ``config`` with ``oiafed run`` in a process slowed by the ``slow_rounds`` callback,
    SIGKILL it once ``after_rounds`` rounds are recorded, resume it with ``oiafed run
    --resume``; then run it whole in this process. Returns the resumed run's metrics rows
    and the whole run's result (the run folder is ``tmp_path / "killed"``)."""
    (tmp_path / "slow_rounds.py").write_text(SLOW_ROUNDS)
    config = {**config, "imports": [*config.get("imports", []), "slow_rounds"],
              "callbacks": [{"type": "slow_rounds", "args": {"seconds": 0.3}},
                            *config.get("callbacks", [])]}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "oiafed.cli", "run"]
    process = subprocess.Popen([*command, str(config_file), "--run-dir", str(run_dir), "-q"],
                               env=env, cwd=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_rounds:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert len(metrics.read_text().splitlines()) < config["trainer"]["args"]["rounds"]
    resumed = subprocess.run([*command, "--resume", str(run_dir), "-q"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        whole = oiafed.run(config, run_dir=tmp_path / "whole",
                           overrides=["callbacks.0.args.seconds=0"])
    finally:
        sys.path.remove(str(tmp_path))
    return [json.loads(line) for line in metrics.read_text().splitlines()], whole


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two state dicts with the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
