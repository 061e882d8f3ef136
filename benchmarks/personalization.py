"""Personalized federated learning on MNIST: mean personal accuracy and the worst-10 %
client's accuracy of FedAvg, FedAvg + fine-tuning and every personalized method.

The evidence of the issue "Personalized FL" (part 5). Each cell, one (split, method, seed), is
one ``oiafed.run`` through the public API (serial runtime, one torch thread, CPU, no
checkpoints): MNIST's 60,000 training images over 100 clients, 10 sampled per round, 20 % of
each client's data held out as its local test set (``data.local_test_fraction: 0.2``), the
2NN of McMahan et al. (``fedavg_2nn``), SGD lr 0.05, batch 50, 1 local epoch; every client's
personal model evaluated on its local test set at the last round. Two splits: ``shards``
(pathological: two label-sorted shards per client, McMahan et al.) and ``dirichlet``
(Dirichlet(0.1) label skew). Methods with their registered defaults: ``fedavg`` (the global
model), ``finetune`` (1 epoch), ``fedbn``, ``fedper`` and ``fedrep`` (head: the 2NN's output
layer; FedRep's 10 head epochs), ``ditto`` (lambda 0.1), ``moon`` (mu 1, tau 0.5). Evaluation
protocol: ``finetune`` fine-tunes 1 epoch before evaluating; the others evaluate the personal
model as stored (FedPer, FedRep: the global body and the client's stored head).

Results: one JSON per cell, ``OUT/<split>/<method>_seed<N>.json`` (config and history),
written when the cell ends; a cell whose JSON exists is not run again. The table (mean ±
sample standard deviation over the seeds) goes to stdout and ``OUT/README.md`` with the
command, date and machine.

    python benchmarks/personalization.py --rounds 50 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import oiafed

MNIST = "/work/shared/data/mnist"
METHODS = ("fedavg", "finetune", "fedbn", "fedper", "fedrep", "ditto", "moon")
SPLITS = {
    "shards": {"type": "shards", "args": {"labels_per_client": 2}},
    "dirichlet": {"type": "dirichlet", "args": {"alpha": 0.1}},
}


def cell_config(split: str, method: str, seed: int, rounds: int, root: str) -> dict[str, Any]:
    """The experiment of one cell."""
    return {
        "name": f"personal-{split}-{method}-{seed}",
        "seed": seed,
        "device": "cpu",
        "data": {"type": "mnist", "args": {"root": root}, "num_clients": 100,
                 "local_test_fraction": 0.2, "partition": SPLITS[split]},
        "model": {"type": "fedavg_2nn"},
        "trainer": {"args": {"rounds": rounds, "clients_per_round": 10, "eval_every": rounds}},
        "learner": {"args": {"epochs": 1, "batch_size": 50, "lr": 0.05}},
        "aggregator": {"type": method},
        "runtime": {"checkpoint_every": 0},
    }


def run_cell(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The cell's stored result, or run it and store it."""
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:  # the JSON keeps what matters
        result = oiafed.run(config, run_dir=run_dir)
    record = {"config": config, "history": result.history,
              "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def table(results: dict[tuple[str, str], list[dict[str, Any]]], splits: list[str],
          methods: list[str]) -> str:
    """Markdown: per method, each split's mean personal accuracy and worst-10 % client's."""
    head = "| method | " + " | ".join(
        f"{s}: personal acc. (%) | {s}: worst-10 % client (%) | {s}: global test acc. (%)"
        for s in splits) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(splits)]
    for method in methods:
        cells = []
        for split in splits:
            last = [r["history"][-1] for r in results.get((split, method), [])]
            cells += [mean_std([row["personal_accuracy"] for row in last]),
                      mean_std([row["personal_accuracy_p10"] for row in last]),
                      mean_std([row["accuracy"] for row in last])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--root", default=MNIST)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "personalization")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for seed in args.seeds:  # every method and split of a seed before the next seed
        for split in args.splits:
            for method in args.methods:
                config = cell_config(split, method, seed, args.rounds, args.root)
                record = run_cell(args.out / split / f"{method}_seed{seed}.json", config)
                results.setdefault((split, method), []).append(record)
                last = record["history"][-1]
                print(f"{split} {method} seed {seed}: personal {last['personal_accuracy']:.4f} "
                      f"p10 {last['personal_accuracy_p10']:.4f} ({record['seconds']:.0f} s)",
                      flush=True)
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    text = (f"Command: `python {' '.join(sys.argv)}`\n\nDate: {date}. Machine: "
            f"{platform.processor() or platform.machine()}, 2-core Xeon VM, CPU only, one torch "
            f"thread; torch {torch.__version__}.\n\n"
            + table(results, args.splits, args.methods) + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
