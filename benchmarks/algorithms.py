"""Federated algorithms side by side: accuracy over rounds, rounds to a target, robustness.

The evidence of the issue "Federated algorithms with both halves" (section 5). Each cell, one
(part, setting, algorithm, seed), is one ``oiafed.run`` through the public API (serial runtime,
one torch thread, no checkpoints, on the CPU). Three parts:

* ``synthetic``: LEAF Synthetic(1, 1) as the FedProx paper sets it up (Li et al., MLSys 2020,
  Section 5.1 and Appendix C): 30 clients, ``50 + floor(LogNormal(4, 2))`` samples each (LEAF's
  power law, 10 % held out: the test set is all 30 clients' held-out data), 10 clients sampled
  per round, multinomial logistic regression (``logreg``), SGD lr 0.01, batch 10, 20 local
  epochs; FedProx with mu = 1 (the paper's choice for Synthetic(1, 1)). Two settings:
  ``stragglers_0`` and ``stragglers_90`` (``straggler_fraction`` 0.9: nine of the ten sampled
  clients do a uniform 1..20 local epochs). In ``stragglers_90`` the row ``fedavg`` drops the
  stragglers (the paper's FedAvg baseline) and ``fedavg_keep`` averages their partial work;
  FedProx and FedNova use it. Evaluated every round. The paper runs 200 rounds; the default
  here is 100 (cost, below), so compare curves' starts, not the paper's end points.
* ``mnist``: MNIST (the 70,000 images pooled; a stratified 10,000 drawn as the test set),
  Dirichlet(0.1) label skew over 100 clients, 10 sampled per round, oiafed's ``cnn`` (conv 32,
  conv 64, dense 128), SGD lr 0.05, batch 32, 1 local epoch, 50 rounds, evaluated every 5
  rounds (rounds to target have that resolution). FedProx uses oiafed's default mu = 0.01
  (the paper tunes mu per dataset and has no CNN on MNIST).
* ``robust``: ``fedavg``, ``median``, ``trimmed_mean`` (beta 0.2), ``krum`` and ``multi_krum``
  (f = 4, m = n - f) on a cheap IID task: MNIST split evenly (IID) over 20 clients, all 20 in
  every round, an MLP (one hidden layer of 64), SGD lr 0.05, batch 32, 1 local epoch, 50
  rounds. Settings: ``clean`` (every aggregator: what it costs without an attack) and one per
  attack with 20 % attacked clients (``fraction: 0.2``: 4 of the 20, in every round; Krum's
  f = 4 fits, 20 > 2f + 2): ``sign_flip`` with scale 10 (at scale 4 the 4 flipped updates
  cancel the 16 honest ones exactly; 10 reverses the mean), ``gaussian`` (std 1),
  ``label_flip``, ``alie`` (the paper's z_max) and ``ipm`` (epsilon 0.1). IID MNIST rather
  than a Synthetic task: it is where the robust-aggregation papers (Blanchard et al., Yin et
  al., Baruch et al.) report, and a round costs under a second.

Every other algorithm uses its registered defaults (its paper's): ``scaffold`` (server_lr 1),
``fednova``, ``feddyn`` (alpha 0.01), ``fedavgm`` (server_lr 1, momentum 0.9), ``fedadam``/
``fedyogi``/``fedadagrad`` (server_lr 0.01, tau 1e-3, betas 0.9/0.99), ``median``,
``trimmed_mean`` (beta 0.1), ``krum``/``multi_krum`` (f 1) in the first two parts. ``--set``
changes an argument. Algorithms not registered (``oiafed.registry``) are skipped with a note.

Reported per (setting, algorithm), mean ± sample standard deviation over the seeds: test
accuracy at 25 %, 50 % and 100 % of the rounds (the last evaluated round at or before them),
the best accuracy, the rounds to ``--target`` (the first evaluated round reaching it, over the
seeds that did, "(k/n)" when not all did, "—" when none did), ``jitter`` (the mean absolute
change of accuracy between consecutive evaluations over the second half of the rounds: how
unstable the curve is) and the mean seconds per round (rounds 2.., evaluations included).
Then an automatic reading of the papers' qualitative claims against these numbers (check it
against the curves in the JSONs).

Results: one JSON per cell, ``OUT/<part>/<setting>/<algorithm>_seed<N>.json`` (the config,
the history of every round, timings), written as soon as the cell ends. A cell whose JSON
exists with the same config (the runtime aside) is not run again, so an interrupted run
continues where it stopped and re-running a command only prints its tables; one stored with
another config (other ``--rounds``, ``--set``) is run again and replaced, so give such runs
their own ``--out``. The tables go to stdout, to ``OUT/<part>/README.md`` (with the command,
date, machine and torch version) and, all parts that have one, to ``OUT/README.md``.
``--jobs N`` runs N cells at once, each in its own spawned process with one torch thread:
results do not depend on it (nor on ``--runtime``).

Cost, measured on the 2-core development machine (Intel Xeon, shared with other work, so
these are upper bounds), one torch thread per cell, CPU seconds:

* synthetic: ~0.14 ms per local SGD step (batch 10); a round's cost follows the sizes of the
  clients sampled (LEAF's power law; seed 0 has a client of 9,113 samples): FedAvg at 0 %
  stragglers 1.56 s a round for seed 0, 0.66-0.71 s for seeds 1 and 2; at 90 % about half of
  that (stragglers do 10.5 epochs on average). In short runs FedProx's proximal term added ~60 %
  a round, FedDyn ~20 %, SCAFFOLD ~5 %. 100 rounds: 1.1-2.6 min a cell at 0 %, 0.6-1.5 min at
  90 %; 2 settings x 14 rows x 3 seeds = 81 cells, ~1.8 CPU hours (200 rounds: ~3.6).
* mnist: ~0.38 ms per image trained (a round's ~5,800 images: ~2.2 s), ~3.6 s per evaluation
  of the 10,000 test images (every 5th round): ~2.9 s a round, 50 rounds plus loading ~2.5 min
  a cell (SCAFFOLD ~10 % more); 13 x 3 = 39 cells, ~1.7 CPU hours.
* robust: ~0.7 s a round (60,000 MLP images trained, 10,000 evaluated), 50 rounds plus
  loading ~38 s a cell; 6 settings x 5 x 3 = 90 cells, ~1 CPU hour.

All of it: ~4.5 CPU hours; with ``--jobs 2`` on two free cores, ~2.3 hours.

Run from the repository root (``--jobs 2`` on two free cores halves the wall time):

    .venv/bin/python benchmarks/algorithms.py --jobs 2           # every part, seeds 0,1,2
    .venv/bin/python benchmarks/algorithms.py --part synthetic --jobs 2
    .venv/bin/python benchmarks/algorithms.py --part mnist --jobs 2
    .venv/bin/python benchmarks/algorithms.py --part robust --jobs 2
    .venv/bin/python benchmarks/algorithms.py --part synthetic --rounds 200 --jobs 2 \\
        --out benchmarks/results/algorithms-200                   # the paper's 200 rounds
    .venv/bin/python benchmarks/algorithms.py --dry-run          # list the cells, run none
    .venv/bin/python benchmarks/algorithms.py --part synthetic --algorithms fedavg --seeds 0 \\
        --rounds 2 --out /tmp/algbench                            # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "algorithms"
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
FRACTIONS = (0.25, 0.5, 1.0)
"""The fixed rounds reported, as shares of the rounds."""
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fednova", "feddyn", "fedavgm", "fedadam",
              "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum", "multi_krum")
ROBUST = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")
VARIANTS = {"fedavg_keep": "fedavg"}
"""Rows that are a registered algorithm with other arguments: label -> aggregator type."""
ATTACKS: dict[str, dict[str, Any]] = {
    "sign_flip": {"scale": 10.0},
    "gaussian": {"std": 1.0},
    "label_flip": {},
    "alie": {},
    "ipm": {"epsilon": 0.1},
}
"""Each attack's arguments besides ``fraction`` (``ATTACK_FRACTION``)."""
ATTACK_FRACTION = 0.2
HOLD_MARGIN = 0.05
"""A robust rule "holds" under attack when its final accuracy is within this of clean FedAvg's."""
COLLAPSE_DROP = 0.2
"""FedAvg "collapses" under attack when its final accuracy falls this far below clean FedAvg's."""


# -- what runs: parts, settings, cells ----------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    trainer: dict[str, Any] = field(default_factory=dict)
    attack: str | None = None
    rows: tuple[str, ...] = ALGORITHMS


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    rounds: int
    target: float
    eval_every: int
    uses_mnist: bool
    base: Callable[[Path], dict[str, Any]]
    settings: tuple[Setting, ...]
    algorithm_args: dict[str, dict[str, Any]] = field(default_factory=dict)


def synthetic_base(mnist_root: Path) -> dict[str, Any]:
    return {
        "data": {"type": "synthetic", "num_clients": 30, "test_fraction": 0.1,
                 "args": {"alpha": 1.0, "beta": 1.0, "samples_per_client": 50,
                          "size_lognormal": [4.0, 2.0], "test_clients": 30}},
        "model": {"type": "logreg"},
        "trainer": {"args": {"clients_per_round": 10}},
        "learner": {"args": {"epochs": 20, "batch_size": 10, "lr": 0.01, "optimizer": "sgd"}},
    }


def mnist_base(mnist_root: Path) -> dict[str, Any]:
    return {
        "data": {"type": "mnist", "num_clients": 100, "test_fraction": 1 / 7, "test_set": "split",
                 "args": {"root": str(mnist_root)},
                 "partition": {"type": "dirichlet", "args": {"alpha": 0.1}}},
        "model": {"type": "cnn"},
        "trainer": {"args": {"clients_per_round": 10}},
        "learner": {"args": {"epochs": 1, "batch_size": 32, "lr": 0.05, "optimizer": "sgd"}},
    }


def robust_base(mnist_root: Path) -> dict[str, Any]:
    return {
        "data": {"type": "mnist", "num_clients": 20, "test_fraction": 1 / 7, "test_set": "split",
                 "args": {"root": str(mnist_root)}, "partition": {"type": "iid"}},
        "model": {"type": "mlp", "args": {"hidden": [64]}},
        "trainer": {"args": {"clients_per_round": 20}},
        "learner": {"args": {"epochs": 1, "batch_size": 32, "lr": 0.05, "optimizer": "sgd"}},
    }


PARTS: dict[str, Part] = {
    "synthetic": Part(
        "synthetic", "LEAF Synthetic(1,1), 30 clients, 10 per round, logreg, E=20, batch 10, "
        "lr 0.01", rounds=100, target=0.7, eval_every=1, uses_mnist=False, base=synthetic_base,
        settings=(
            Setting("stragglers_0", "0 % stragglers", {"straggler_fraction": 0.0}),
            Setting("stragglers_90", "90 % stragglers (fedavg drops them; fedavg_keep keeps "
                    "their partial work)", {"straggler_fraction": 0.9},
                    rows=(*ALGORITHMS[:1], "fedavg_keep", *ALGORITHMS[1:])),
        ),
        algorithm_args={"fedprox": {"mu": 1.0}},
    ),
    "mnist": Part(
        "mnist", "MNIST, Dirichlet(0.1) over 100 clients, 10 per round, cnn, E=1, batch 32, "
        "lr 0.05", rounds=50, target=0.85, eval_every=5, uses_mnist=True, base=mnist_base,
        settings=(Setting("dirichlet_0.1", "Dirichlet(0.1) label skew"),),
    ),
    "robust": Part(
        "robust", "MNIST IID over 20 clients, all per round, mlp [64], E=1, batch 32, lr 0.05; "
        "20 % attacked", rounds=50, target=0.9, eval_every=1, uses_mnist=True, base=robust_base,
        settings=(Setting("clean", "no attack", rows=ROBUST),
                  *(Setting(name, f"{name} on 20 % of clients", attack=name, rows=ROBUST)
                    for name in ATTACKS)),
        algorithm_args={"trimmed_mean": {"beta": 0.2}, "krum": {"f": 4}, "multi_krum": {"f": 4}},
    ),
}


@dataclass(frozen=True)
class Cell:
    part: str
    setting: str
    algorithm: str
    seed: int
    config: dict[str, Any] = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.part}/{self.setting}/{self.algorithm} seed {self.seed}"

    def path(self, out: Path) -> Path:
        return out / self.part / self.setting / f"{self.algorithm}_seed{self.seed}.json"


def aggregator_section(part: Part, setting: Setting, label: str,
                       overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``aggregator`` section of a row: its type, the part's arguments, the straggler
    handling of the FedProx paper's FedAvg, and ``--set`` overrides."""
    args = dict(part.algorithm_args.get(label, {}))
    if setting.trainer.get("straggler_fraction") and label in ("fedavg", "fedavg_keep"):
        args["drop_stragglers"] = label == "fedavg"
    args.update(overrides.get(label, {}))
    return {"type": VARIANTS.get(label, label), "args": args}


def cell_config(part: Part, setting: Setting, label: str, seed: int, rounds: int,
                options: argparse.Namespace) -> dict[str, Any]:
    config = copy.deepcopy(part.base(options.mnist_root))
    config["name"] = f"{part.name}-{setting.name}-{label}-s{seed}"
    config["seed"] = seed
    config["device"] = options.device
    config["trainer"]["args"].update(rounds=rounds, eval_every=part.eval_every, **setting.trainer)
    config["aggregator"] = aggregator_section(part, setting, label, options.overrides.get(part.name, {}))
    if setting.attack is not None:
        config["attack"] = {"type": setting.attack,
                            "args": {"fraction": ATTACK_FRACTION, **ATTACKS[setting.attack]}}
    runtime: dict[str, Any] = {"mode": options.runtime, "checkpoint_every": 0}
    if options.runtime == "parallel":
        runtime.update(workers=options.workers, threads=1)
    config["runtime"] = runtime
    return config


def plan(options: argparse.Namespace, registered: set[str]) -> tuple[list[Cell], list[str]]:
    """The cells to report (run or cached) and notes on what was left out."""
    cells: list[Cell] = []
    notes: list[str] = []
    for part in (PARTS[name] for name in options.parts):
        if part.uses_mnist and not has_mnist(options.mnist_root):
            notes.append(f"{part.name}: skipped, no MNIST IDX files under {options.mnist_root} "
                         "(--mnist-root)")
            continue
        rounds = options.rounds or part.rounds
        before = len(cells)
        for setting in part.settings:
            if options.settings and setting.name not in options.settings:
                continue
            for label in setting.rows:
                if options.algorithms and label not in options.algorithms:
                    continue
                kind = VARIANTS.get(label, label)
                if kind not in registered:
                    note = f"{label}: skipped, aggregator {kind!r} is not registered"
                    if note not in notes:
                        notes.append(note)
                    continue
                cells += [Cell(part.name, setting.name, label, seed,
                               cell_config(part, setting, label, seed, rounds, options))
                          for seed in options.seeds]
        if len(cells) == before:
            notes.append(f"{part.name}: no cells (--algorithms and --settings select none of it)")
    return cells, notes


def has_mnist(root: Path) -> bool:
    """Whether ``root`` holds MNIST's four IDX files where ``dataset.mnist`` looks for them."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    folders = (root, root / "MNIST" / "raw", root / "raw")
    return all(any((f / name).is_file() for f in folders for name in (s, f"{s}.gz")) for s in stems)


# -- running a cell (in this process or a spawned one) --------------------------------------------


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_cell(config: dict[str, Any]) -> dict[str, Any]:
    """One ``oiafed.run`` of ``config`` in a temporary run folder: the cell's result record."""
    import oiafed

    init_worker()
    started, cpu_started = time.perf_counter(), time.process_time()
    record: dict[str, Any] = {"config": config}
    with tempfile.TemporaryDirectory(prefix="oiafed-algbench-") as tmp:
        try:
            result = oiafed.run(config, run_dir=Path(tmp) / "run")
        except Exception as exc:  # a failed run (divergence, an algorithm in progress) is a result
            record.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                          history=partial_history(Path(tmp) / "run"))
        else:
            record.update(history=result.history, wall_time=result.wall_time,
                          stop_reason=result.stop_reason)
    record["elapsed"] = time.perf_counter() - started
    record["cpu_time"] = time.process_time() - cpu_started  # this process's (serial runtime: all)
    return record


def partial_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds a failed run recorded before it failed (its ``metrics.jsonl``)."""
    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]


def cache_key(config: dict[str, Any]) -> dict[str, Any]:
    """What decides a cell's result: its config less the runtime (results do not depend on it)."""
    return {k: v for k, v in config.items() if k != "runtime"}


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached(cell: Cell, out: Path, retry_errors: bool) -> dict[str, Any] | None:
    """The stored record of ``cell`` when it was run with the same config, else None."""
    record = load_record(cell.path(out))
    if record is None or cache_key(record.get("config", {})) != cache_key(cell.config):
        return None
    if retry_errors and "error" in record:
        return None
    return record


def save_record(cell: Cell, out: Path, record: dict[str, Any]) -> None:
    path = cell.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"part": cell.part, "setting": cell.setting, "algorithm": cell.algorithm,
            "seed": cell.seed, "finished": now()}
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps({**meta, **record}, indent=1) + "\n", encoding="utf-8")
    os.replace(temp, path)


def run_cells(cells: list[Cell], out: Path, jobs: int) -> dict[Cell, dict[str, Any]]:
    """Run ``cells``, ``jobs`` at a time, saving each record as soon as it is done."""
    done: dict[Cell, dict[str, Any]] = {}

    def finish(cell: Cell, record: dict[str, Any]) -> None:
        save_record(cell, out, record)
        done[cell] = record
        print(f"[{len(done)}/{len(cells)}] {cell.name}: {summary_line(record)}", flush=True)

    if jobs <= 1:
        for cell in cells:
            finish(cell, run_cell(cell.config))
        return done
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # before the workers import torch
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                initializer=init_worker) as pool:
        futures = {pool.submit(run_cell, cell.config): cell for cell in cells}
        try:
            for future in concurrent.futures.as_completed(futures):
                cell = futures[future]
                try:
                    record = future.result()
                except Exception as exc:  # the worker died (memory, a signal): not saved, re-run later
                    print(f"{cell.name}: worker failed ({type(exc).__name__}: {exc})", flush=True)
                    continue
                finish(cell, record)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return done


def summary_line(record: dict[str, Any]) -> str:
    accuracies = evaluated(record["history"])
    text = (f"final accuracy {accuracies[-1][1]:.4f}, best {max(a for _, a in accuracies):.4f}"
            if accuracies else "no evaluation")
    if "error" in record:
        text = f"FAILED after {len(record['history'])} rounds ({record['error']}); {text}"
    return (f"{text}; {record['elapsed']:.1f} s ({record['cpu_time']:.1f} s CPU), "
            f"{mean_round_time(record):.3f} s/round")


# -- statistics ---------------------------------------------------------------------------------


def evaluated(history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """``(round, accuracy)`` of the evaluated rounds."""
    return [(int(row["round"]), float(row["accuracy"])) for row in history
            if isinstance(row.get("accuracy"), int | float)]


def report_rounds(rounds: int, eval_every: int) -> list[int]:
    """The fixed rounds reported: per share of ``FRACTIONS``, the last evaluated round at or
    before it (rounds are evaluated every ``eval_every`` and at the last)."""
    points = [r for r in range(1, rounds + 1) if r % eval_every == 0 or r == rounds]
    wanted = [math.ceil(share * rounds) for share in FRACTIONS]
    return sorted({max((r for r in points if r <= w), default=points[0]) for w in wanted})


def accuracy_at(record: dict[str, Any], round_num: int) -> float | None:
    return next((a for r, a in evaluated(record["history"]) if r == round_num), None)


def rounds_to(record: dict[str, Any], target: float) -> int | None:
    return next((r for r, a in evaluated(record["history"]) if a >= target), None)


def jitter(record: dict[str, Any], rounds: int) -> float | None:
    """Mean absolute change of accuracy between consecutive evaluations in the second half."""
    points = [a for r, a in evaluated(record["history"]) if r > rounds // 2]
    steps = [abs(b - a) for a, b in itertools.pairwise(points)]
    return statistics.fmean(steps) if steps else None


def mean_round_time(record: dict[str, Any]) -> float:
    """Mean ``round_time`` of rounds 2.. (round 1 warms up), evaluations included."""
    times = [row["round_time"] for row in record["history"] if "round_time" in row]
    return statistics.fmean(times[1:] if len(times) > 1 else times) if times else math.nan


def mean_std(values: Iterable[float | None], digits: int = 3) -> str:
    numbers = [v for v in values if v is not None]
    if not numbers:
        return "—"
    mean = statistics.fmean(numbers)
    if len(numbers) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(numbers):.{digits}f}"


def rounds_text(values: list[int | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "—"
    text = mean_std(reached, 1)
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


# -- tables and findings ------------------------------------------------------------------------


@dataclass
class Row:
    algorithm: str
    records: list[dict[str, Any]]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" not in r]


def group(cells: list[Cell], records: dict[Cell, dict[str, Any]], part: str,
          setting: str) -> list[Row]:
    rows: dict[str, Row] = {}
    for cell in cells:
        if (cell.part, cell.setting) == (part, setting) and cell in records:
            rows.setdefault(cell.algorithm, Row(cell.algorithm, [])).records.append(records[cell])
    return list(rows.values())


def table(rows: list[Row], rounds: int, eval_every: int, target: float) -> list[str]:
    fixed = report_rounds(rounds, eval_every)
    head = ["algorithm", "seeds", *(f"acc @ {r}" for r in fixed), "best",
            f"rounds to {target:g}", "jitter", "s/round"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for row in rows:
        ok = row.ok
        cells = [row.algorithm, f"{len(ok)}/{len(row.records)}" if len(ok) < len(row.records)
                 else str(len(ok))]
        cells += [mean_std(accuracy_at(r, at) for r in ok) for at in fixed]
        cells.append(mean_std(max((a for _, a in evaluated(r["history"])), default=None)
                              for r in ok))
        cells.append(rounds_text([rounds_to(r, target) for r in ok]))
        cells.append(mean_std((jitter(r, rounds) for r in ok), 4))
        cells.append(mean_std((mean_round_time(r) for r in row.records), 2))
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        for record in row.records:
            if "error" in record:
                lines.append(f"\n{row.algorithm} seed {record['config']['seed']} failed after "
                             f"{len(record['history'])} rounds: {record['error']}")
    return lines


def final_mean(rows: list[Row], algorithm: str) -> float | None:
    """Mean final accuracy of ``algorithm`` over its seeds (a failed seed counts 0)."""
    row = next((r for r in rows if r.algorithm == algorithm), None)
    if row is None or not row.records:
        return None
    finals = []
    for record in row.records:
        points = evaluated(record["history"])
        finals.append(points[-1][1] if points and "error" not in record else 0.0)
    return statistics.fmean(finals)


def mean_rounds(rows: list[Row], algorithm: str, target: float, rounds: int) -> float | None:
    """Mean rounds to ``target``, a seed that never reached it counting ``rounds + 1``."""
    row = next((r for r in rows if r.algorithm == algorithm), None)
    if row is None or not row.records:
        return None
    return statistics.fmean(rounds_to(r, target) or rounds + 1 for r in row.records)


def mean_jitter(rows: list[Row], algorithm: str, rounds: int) -> float | None:
    row = next((r for r in rows if r.algorithm == algorithm), None)
    values = [j for r in row.ok if (j := jitter(r, rounds)) is not None] if row else []
    return statistics.fmean(values) if values else None


def verdict(ok: bool) -> str:
    return "agrees" if ok else "disagrees"


def straggler_finding(rows: list[Row], rounds: int) -> list[str]:
    """FedProx stabilises FedAvg under stragglers (FedProx paper, Figure 1): a higher final
    accuracy than FedAvg dropping the stragglers; the jitter of both curves beside it."""
    avg, prox = final_mean(rows, "fedavg"), final_mean(rows, "fedprox")
    if avg is None or prox is None:
        return []
    j_avg, j_prox = mean_jitter(rows, "fedavg", rounds), mean_jitter(rows, "fedprox", rounds)
    steadier = ("" if j_avg is None or j_prox is None else
                f"; its curve is {'steadier' if j_prox <= j_avg else 'less steady'} "
                f"(jitter {j_prox:.4f} vs {j_avg:.4f})")
    return [f"- FedProx stabilises FedAvg under 90 % stragglers (Li et al.): final accuracy "
            f"fedprox {prox:.3f} vs fedavg dropping stragglers {avg:.3f}: {verdict(prox >= avg)}"
            f"{steadier}."]


def drift_finding(rows: list[Row], target: float, rounds: int, where: str) -> list[str]:
    """SCAFFOLD and FedDyn reach a target in fewer rounds than FedAvg under heterogeneity."""
    base = mean_rounds(rows, "fedavg", target, rounds)
    lines = []
    for algorithm in ("scaffold", "feddyn"):
        mine = mean_rounds(rows, algorithm, target, rounds)
        if base is None or mine is None:
            continue
        lines.append(f"- {algorithm} converges in fewer rounds than FedAvg ({where}): mean rounds "
                     f"to {target:g} {mine:.1f} vs {base:.1f} (never reached = {rounds + 1}): "
                     f"{verdict(mine < base)}.")
    return lines


def robust_finding(by_setting: dict[str, list[Row]]) -> list[str]:
    """Median, trimmed mean and Krum hold accuracy under sign flipping; FedAvg collapses."""
    clean = final_mean(by_setting.get("clean", []), "fedavg")
    flipped = by_setting.get("sign_flip", [])
    attacked = final_mean(flipped, "fedavg")
    if clean is None or attacked is None:
        return []
    lines = [f"- FedAvg collapses under sign flipping: final accuracy {attacked:.3f} vs "
             f"{clean:.3f} clean (collapse: a drop of {COLLAPSE_DROP} or more): "
             f"{verdict(clean - attacked >= COLLAPSE_DROP)}."]
    for algorithm in ROBUST[1:]:
        mine = final_mean(flipped, algorithm)
        if mine is not None:
            lines.append(f"- {algorithm} holds accuracy under sign flipping: {mine:.3f} vs clean "
                         f"FedAvg {clean:.3f} (holds: within {HOLD_MARGIN}): "
                         f"{verdict(mine >= clean - HOLD_MARGIN)}.")
    return lines


def robust_matrix(by_setting: dict[str, list[Row]]) -> list[str]:
    """Final accuracy, aggregator x attack."""
    settings = [s for s in by_setting if by_setting[s]]
    lines = ["| aggregator | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    algorithms = dict.fromkeys(r.algorithm for s in settings for r in by_setting[s])
    for algorithm in algorithms:
        values = []
        for setting in settings:
            row = next((r for r in by_setting[setting] if r.algorithm == algorithm), None)
            values.append(mean_std(evaluated(r["history"])[-1][1] for r in row.ok
                                   if evaluated(r["history"])) if row else "")
        lines.append(f"| {algorithm} | " + " | ".join(values) + " |")
    return lines


def part_report(part: Part, cells: list[Cell], records: dict[Cell, dict[str, Any]],
                options: argparse.Namespace) -> list[str]:
    rounds = options.rounds or part.rounds
    target = options.targets.get(part.name, part.target)
    lines = [f"{rounds} rounds (evaluated every {part.eval_every}), seeds "
             f"{','.join(map(str, options.seeds))}, target accuracy {target:g}.", ""]
    by_setting = {s.name: group(cells, records, part.name, s.name) for s in part.settings}
    for setting in part.settings:
        rows = by_setting[setting.name]
        if rows:
            lines += [f"### {part.name} / {setting.name}: {setting.title}", "",
                      *table(rows, rounds, part.eval_every, target), ""]
    if part.name == "robust" and any(by_setting.values()):
        lines += ["### robust: final accuracy, aggregator x attack", "", *robust_matrix(by_setting), ""]
    findings: list[str] = []
    if part.name == "synthetic":
        findings += straggler_finding(by_setting.get("stragglers_90", []), rounds)
        findings += drift_finding(by_setting.get("stragglers_0", []), target, rounds,
                                  "Synthetic(1,1), no stragglers")
    elif part.name == "mnist":
        findings += drift_finding(by_setting.get("dirichlet_0.1", []), target, rounds,
                                  "MNIST Dirichlet(0.1)")
    else:
        findings += robust_finding(by_setting)
    if findings:
        lines += ["### Against the papers (automatic reading; check the curves)", "", *findings, ""]
    return lines


def header(options: argparse.Namespace, ran: int, reused: int) -> list[str]:
    import torch

    command = shlex.join([".venv/bin/python", "benchmarks/algorithms.py", *sys.argv[1:]])
    reuse = (f"; {reused} of its {ran + reused} cells were reused from earlier runs (each JSON's "
             "`finished`)" if reused else "")
    return [f"Command: `{command}`  ", f"Date: {now()}{reuse}  ",
            f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"--jobs {options.jobs}, runtime {options.runtime}, one torch thread per cell", "",
            "Columns: mean ± sample std over seeds; `acc @ r`: test accuracy after round r; "
            "`rounds to`: first evaluated round at the target, over the seeds that reached it "
            "((k/n): not all did; —: none did); `jitter`: mean |change| of accuracy between "
            "evaluations in the second half of the rounds; `s/round`: mean round time (rounds "
            "2.., evaluations included).", ""]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_reports(options: argparse.Namespace, cells: list[Cell], records: dict[Cell, dict[str, Any]],
                  notes: list[str], ran: set[Cell]) -> None:
    """Print each part's report and write it to ``OUT/<part>/README.md``; ``OUT/README.md``
    gathers every part's last report."""
    out: Path = options.out
    for name in options.parts:
        mine = [c for c in cells if c.part == name]
        if not mine:
            continue
        fresh = sum(c in ran for c in mine)
        text = "\n".join([f"## {name}: {PARTS[name].title}", "",
                          *header(options, fresh, len(mine) - fresh),
                          *(f"Note: {n}  " for n in notes),
                          *part_report(PARTS[name], cells, records, options)])
        print("\n" + text)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "README.md").write_text(text + "\n", encoding="utf-8")
    sections = [(out / n / "README.md").read_text(encoding="utf-8") for n in PARTS
                if (out / n / "README.md").is_file()]
    if sections:
        intro = ("# oiafed algorithms benchmark\n\nWritten by `benchmarks/algorithms.py` (its "
                 "docstring: the setups and commands); one section per part, from its last run.\n")
        (out / "README.md").write_text("\n".join([intro, *sections]), encoding="utf-8")


# -- the driver ---------------------------------------------------------------------------------


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_targets(items: list[str]) -> dict[str, float]:
    """``--target 0.8`` (every part) or ``--target mnist=0.95``."""
    targets: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        for part in ([name] if sep else list(PARTS)):
            if part not in PARTS:
                raise SystemExit(f"--target {item}: unknown part {part!r}")
            targets[part] = float(value)
    return targets


def parse_overrides(items: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``--set [PART:]ALGORITHM.KEY=VALUE`` (value parsed as YAML) -> part -> label -> args."""
    found: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PARTS}
    for item in items:
        target, sep, value = item.partition("=")
        scope, _, path = target.rpartition(":")
        label, dot, key = path.partition(".")
        if not sep or not dot or not key or (scope and scope not in PARTS):
            raise SystemExit(f"--set {item}: write [PART:]ALGORITHM.KEY=VALUE")
        for part in [scope] if scope else list(PARTS):
            found[part].setdefault(label, {})[key] = yaml.safe_load(value)
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--part", default=",".join(PARTS),
                        help=f"comma-separated parts ({', '.join(PARTS)}; default all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per run (default per part: "
                             + ", ".join(f"{p.name} {p.rounds}" for p in PARTS.values()) + ")")
    parser.add_argument("--algorithms", default="",
                        help="comma-separated rows to run (default: each setting's; "
                             "fedavg_keep: FedAvg keeping stragglers' partial work)")
    parser.add_argument("--settings", default="", help="comma-separated settings (default all)")
    parser.add_argument("--target", action="append", default=[],
                        help="target accuracy, VALUE or PART=VALUE (defaults: "
                             + ", ".join(f"{p.name} {p.target}" for p in PARTS.values()) + ")")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="[PART:]ALG.KEY=VALUE", help="an algorithm argument, e.g. fedprox.mu=0.1")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (processes)")
    parser.add_argument("--runtime", choices=("serial", "parallel"), default="serial",
                        help="oiafed runtime of each cell (parallel: --workers processes)")
    parser.add_argument("--workers", type=int, default=2, help="parallel runtime's workers")
    parser.add_argument("--device", default="cpu", help="oiafed device (default cpu)")
    parser.add_argument("--mnist-root", type=Path, default=DEFAULT_MNIST,
                        help="folder of MNIST's IDX files (default ../shared/data/mnist)")
    parser.add_argument("--retry-errors", action="store_true", help="re-run cells that failed")
    parser.add_argument("--dry-run", action="store_true", help="list the cells to run, run none")
    options = parser.parse_args(argv)
    options.parts = parse_list(options.part)
    unknown = [p for p in options.parts if p not in PARTS]
    if unknown or not options.parts:
        parser.error(f"--part: unknown {unknown}; choose from {', '.join(PARTS)}")
    options.seeds = [int(s) for s in parse_list(options.seeds)]
    options.algorithms = parse_list(options.algorithms)
    known = set(ALGORITHMS) | set(VARIANTS)
    if any(a not in known for a in options.algorithms):
        parser.error(f"--algorithms: unknown {sorted(set(options.algorithms) - known)}")
    options.settings = parse_list(options.settings)
    settings = {s.name for p in PARTS.values() for s in p.settings}
    if any(s not in settings for s in options.settings):
        parser.error(f"--settings: unknown {sorted(set(options.settings) - settings)}; "
                     f"choose from {', '.join(sorted(settings))}")
    options.targets = parse_targets(options.target)
    options.overrides = parse_overrides(options.overrides)
    if options.rounds is not None and options.rounds < 1:
        parser.error("--rounds must be >= 1")
    options.mnist_root = options.mnist_root.expanduser().resolve()
    options.out = options.out.expanduser().resolve()
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    from oiafed import registry

    registered = {name.split(".", 1)[1] for name in registry.names("aggregator")}
    cells, notes = plan(options, registered)
    for note in notes:
        print(f"# note: {note}")
    records = {c: r for c in cells if (r := cached(c, options.out, options.retry_errors))}
    todo = [c for c in cells if c not in records]
    print(f"# {len(cells)} cells: {len(records)} done before (in {options.out}), {len(todo)} to run; "
          f"{cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    if options.dry_run:
        for cell in todo:
            print(f"#   {cell.name}")
        return
    started = time.perf_counter()
    fresh = run_cells(todo, options.out, options.jobs)
    records.update(fresh)
    if todo:
        print(f"# ran {len(todo)} cells in {time.perf_counter() - started:.0f} s", flush=True)
    write_reports(options, cells, records, notes, set(fresh))


if __name__ == "__main__":
    main()
