"""Time to first round: what a fresh process pays before and during its first rounds.

For each runtime mode, a config (default ``examples/quickstart.yaml``) runs ``--rounds`` rounds
in a FRESH Python process, so that every import counts, as it does for ``make run``:

* serial: ``runtime.mode=serial``;
* parallel: ``runtime.mode=parallel`` with ``runtime.workers`` = the number of clients;
* grpc: a loopback deployment (``runtime.mode=grpc``, no address): one client process per
  client.

The child process imports oiafed, calls ``oiafed.run(config, callbacks=[...], overrides=[...])``
with a callback that records ``time.monotonic()`` in ``on_train_start`` (after the runtime
has started its workers or its clients have joined), ``on_round_start`` and ``on_round_end``,
and writes the timestamps to a file; its output folder is a temporary one. The monotonic clock
is system-wide (Linux, macOS), so the child's timestamps are measured from the moment this
process started it. Columns, in seconds:

* ``import``: process start -> ``import oiafed`` done (interpreter start-up included);
* ``run()``: process start -> ``oiafed.run`` entered;
* ``ready``: process start -> ``on_train_start`` (data, model, runtime start-up);
* ``r1 start``: process start -> round 1 starts;
* ``r1``, ``r2``: the durations of rounds 1 and 2 (``on_round_start`` -> ``on_round_end``);
* ``steady``: the median duration of rounds 3 and later (of round 2 when there are 2 rounds);
* ``r1/steady``: how much longer the first round takes than a steady one;
* ``returned``: process start -> ``oiafed.run`` returned (workers stopped, run folder written);
* ``total``: process start -> exit (interpreter shut down);
* ``cpu``: CPU seconds (user + system) of the process tree: what the run costs however busy
  the machine is (Unix; processes nobody waited for, such as a forkserver and its children,
  are missing).

With ``--reps N`` every mode runs N times (interleaved) and each column is the median; a
warm-up run of each mode first (``--warmup``) fills the file cache. Children get
``OMP_NUM_THREADS=1`` unless it is set in the environment.

Run from the repository root:

    .venv/bin/python benchmarks/startup.py                       # 3 reps of each mode
    .venv/bin/python benchmarks/startup.py --modes serial --reps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

MODES = ("serial", "parallel", "grpc")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"

# Runs in the child: argv = [timestamps file, config path, overrides as JSON].
CHILD = """\
import time
started = time.monotonic()
import json, sys
import oiafed
imported = time.monotonic()


class Stamps(oiafed.Callback):
    def __init__(self):
        self.marks = {"interpreter": started, "import": imported}
        self.starts, self.ends = [], []

    def on_train_start(self, trainer, **kwargs):
        self.marks["ready"] = time.monotonic()

    def on_round_start(self, trainer, round_num, **kwargs):
        self.starts.append(time.monotonic())

    def on_round_end(self, trainer, round_num, result, **kwargs):
        self.ends.append(time.monotonic())


if __name__ == "__main__":
    out, config, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    stamps = Stamps()
    stamps.marks["run"] = time.monotonic()
    oiafed.run(config, callbacks=[stamps], overrides=overrides)
    stamps.marks["returned"] = time.monotonic()
    with open(out, "w") as f:
        json.dump({**stamps.marks, "starts": stamps.starts, "ends": stamps.ends}, f)
"""

COLUMNS = ("import", "run()", "ready", "r1 start", "r1", "r2", "steady", "r1/steady", "returned",
           "total", "cpu")


def mode_overrides(mode: str, num_clients: int) -> list[str]:
    """The config overrides that select ``mode`` (parallel: one worker per client)."""
    if mode == "parallel":
        return ["runtime.mode=parallel", f"runtime.workers={num_clients}"]
    if mode == "grpc":
        return ["runtime.mode=grpc"]
    return ["runtime.mode=serial"]


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes waited for, grandchildren
    (workers, gRPC clients) included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(config: Path, overrides: list[str], env: dict[str, str]) -> dict[str, float]:
    """One fresh process running ``config``; its columns (seconds)."""
    with tempfile.TemporaryDirectory(prefix="oiafed-startup-") as tmp:
        out = Path(tmp) / "stamps.json"
        args = [*overrides, f"output_dir={tmp}/runs"]
        cpu_before = _children_cpu()
        launched = time.monotonic()
        done = subprocess.run([sys.executable, "-c", CHILD, str(out), str(config), json.dumps(args)],
                              env=env, cwd=tmp, capture_output=True, text=True)
        total = time.monotonic() - launched
        cpu = _children_cpu() - cpu_before
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        marks: dict[str, Any] = json.loads(out.read_text())
    starts, ends = marks["starts"], marks["ends"]
    rounds = [end - start for start, end in zip(starts, ends, strict=True)]
    steady = statistics.median(rounds[2:] or rounds[1:] or rounds)
    return {
        "import": marks["import"] - launched,
        "run()": marks["run"] - launched,
        "ready": marks["ready"] - launched,
        "r1 start": starts[0] - launched,
        "r1": rounds[0],
        "r2": rounds[1] if len(rounds) > 1 else float("nan"),
        "steady": steady,
        "r1/steady": rounds[0] / steady,
        "returned": marks["returned"] - launched,
        "total": total,
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="the experiment (default examples/quickstart.yaml)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated runtime modes (serial,parallel,grpc)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (3)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each mode (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each mode first (1)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or args.rounds < 2:
        parser.error(f"modes are {', '.join(MODES)} and --rounds is at least 2")

    config = args.config.resolve()
    num_clients = int(yaml.safe_load(config.read_text())["data"]["num_clients"])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    overrides = {m: [*mode_overrides(m, num_clients), f"trainer.args.rounds={args.rounds}"]
                 for m in modes}
    for _ in range(args.warmup):
        for mode in modes:
            run_child(config, overrides[mode], env)
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for rep in range(args.reps):
        for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
            rows[mode].append(run_child(config, overrides[mode], env))

    print(f"{config.name}: {num_clients} clients, {args.rounds} rounds, fresh process per run, "
          f"median of {args.reps} reps, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
          f"{os.cpu_count()} CPUs; seconds from process start (import .. r1 start, total), "
          "round durations (r1, r2, steady)")
    print(f"{'mode':<9}" + "".join(f"{c:>10}" for c in COLUMNS))
    for mode, runs in rows.items():
        medians = [statistics.median(r[c] for r in runs) for c in COLUMNS]
        print(f"{mode:<9}" + "".join(f"{v:>10.3f}" for v in medians))


if __name__ == "__main__":
    main()
