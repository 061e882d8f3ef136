"""Accuracy against epsilon on MNIST with central DP-FedAvg (and one local DP-SGD point).

Reduced scale for a 2-core CPU machine: 1,000 IID clients of 60 MNIST training images,
100 sampled per round uniformly without replacement (q = 0.1, what the accountant assumes),
a small MLP (one hidden layer of 64), 1 local epoch of SGD (batch 20, lr 0.1), 50 rounds, the
global model evaluated on the official 10,000 test images. Central DP clips each client's
update to C = 0.5 and adds N(0, (z C)^2) to the sum (fixed denominator 100), for several
noise multipliers z; ``none`` is FedAvg without privacy, ``z = 0`` clipping alone. The local
point runs DP-SGD on every client (z = 1, per-example clip 1.0). epsilon is at delta = 1e-5
(central: per client, replace-one; local: per example, the largest over the clients).

Commands (one JSON per run under ``benchmarks/results/privacy/``; an existing file is kept):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy.py run
    .venv/bin/python benchmarks/privacy.py table
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import oiafed

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "privacy"
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
ROUNDS, CLIENTS, PER_ROUND, CLIP, DELTA = 50, 1000, 100, 0.5, 1e-5
NOISE = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Central noise multipliers z measured (besides no privacy at all)."""


def config(mnist: Path, privacy: dict[str, Any] | None) -> dict[str, Any]:
    """The run's config (``privacy``: the ``privacy:`` section, None for plain FedAvg)."""
    cfg: dict[str, Any] = {
        "name": "privacy-mnist",
        "seed": 0,
        "device": "cpu",
        "data": {"type": "mnist", "args": {"root": str(mnist)}, "num_clients": CLIENTS},
        "model": {"type": "mlp", "args": {"hidden": [64]}},
        "trainer": {"args": {"rounds": ROUNDS, "clients_per_round": PER_ROUND,
                             "eval_every": 5}},
        "learner": {"args": {"epochs": 1, "batch_size": 20, "lr": 0.1}},
        "runtime": {"checkpoint_every": 0},
    }
    if privacy is not None:
        cfg["privacy"] = privacy
    return cfg


RUNS: dict[str, dict[str, Any] | None] = {
    "none": None,
    **{f"central-z{z:g}": {"type": "central",
                           "args": {"noise_multiplier": z, "clip_norm": CLIP,
                                    "target_delta": DELTA}} for z in NOISE},
    "local-z1": {"type": "local", "args": {"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                           "target_delta": DELTA}},
}


def run_one(name: str, mnist: Path) -> None:
    """Run ``name`` unless its JSON exists; write the final accuracy and epsilon."""
    out = RESULTS / f"{name}.json"
    if out.exists():
        return
    privacy = RUNS[name]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = oiafed.run(config(mnist, privacy), run_dir=Path(folder) / "run")
    last = result.history[-1]
    epsilon = last.get("epsilon", last.get("epsilon_max"))
    if epsilon == float("inf"):
        epsilon = "inf"  # JSON has no infinity
    record = {
        "run": name, "privacy": privacy, "rounds": result.rounds_completed,
        "accuracy": last["accuracy"], "epsilon": epsilon, "delta": DELTA if privacy else None,
        "seconds": round(time.perf_counter() - started, 1),
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "accuracy_by_round": {int(row["round"]): row["accuracy"] for row in result.history
                              if "accuracy" in row},
    }
    out.write_text(json.dumps(record, indent=1))
    logging.info("%s: accuracy %.4f, epsilon %s (%ss)", name, record["accuracy"], epsilon,
                 record["seconds"])


def table() -> str:
    """The README's markdown table from the JSON files."""
    lines = ["| run | noise multiplier z | epsilon (delta 1e-5) | test accuracy |",
             "|---|---|---|---|"]
    for name, privacy in RUNS.items():
        file = RESULTS / f"{name}.json"
        if not file.exists():
            continue
        record = json.loads(file.read_text())
        z = "-" if privacy is None else f"{privacy['args']['noise_multiplier']:g}"
        eps = record["epsilon"]
        shown = "-" if eps is None else eps if isinstance(eps, str) else f"{eps:.3g}"
        kind = ("FedAvg, no privacy" if privacy is None
                else "central DP (per client)" if privacy["type"] == "central"
                else "local DP-SGD (per example, max over clients)")
        lines.append(f"| {kind} | {z} | {shown} | {record['accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--mnist-root", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "table":
        print(table())
        return
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.only or RUNS:
        run_one(name, args.mnist_root)


if __name__ == "__main__":
    main()
