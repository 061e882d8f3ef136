"""Framework overhead of ``oiafed.run`` against a hand-written PyTorch FedAvg loop.

Both sides run the same workload in this process: scikit-learn digits (stratified 20 % test
split), 10 IID clients, an MLP 64-64-10, FedAvg over all 10 clients for 20 rounds, each
client one shuffled epoch of SGD (lr 0.05, batch 32, no momentum), the global model
evaluated (loss and accuracy) after every round. oiafed runs quietly (no progress callback)
with its defaults otherwise (run folder files, checkpoints) into a temporary folder; the plain
loop indexes tensors directly (no DataLoader) and writes nothing.

oiafed runs twice: with its defaults, which save the resumable run state after every round,
and with ``checkpoint_every: 0`` (the same work as the plain loop, which saves nothing).
Measured, after one warm-up run of each, over ``--reps`` interleaved repetitions (the order
rotates every repetition):

* end to end: ``oiafed.run(config)`` against the whole plain function, data loading
  included on both sides (oiafed also validates its config and writes its run folder);
* training loop only: oiafed's ``TrainResult.wall_time`` (``Trainer.fit``) against the
  plain loop's rounds.

Each prints median and min seconds and the ratio of medians (oiafed / plain), then both
sides' final test accuracy as a sanity check.

Run from the repository root:

    .venv/bin/python benchmarks/overhead.py            # 10 repetitions
    .venv/bin/python benchmarks/overhead.py --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

import oiafed

ROUNDS, CLIENTS, BATCH, LR, TEST_FRACTION = 20, 10, 32, 0.05, 0.2

CONFIG = {
    "name": "overhead",
    "data": {"type": "digits", "args": {"flatten": True}, "num_clients": CLIENTS,
             "test_fraction": TEST_FRACTION, "partition": {"type": "iid"}},
    "model": {"type": "mlp", "args": {"hidden": [64]}},
    "trainer": {"type": "default",
                "args": {"rounds": ROUNDS, "clients_per_round": CLIENTS, "eval_every": 1}},
    "learner": {"type": "default", "args": {"epochs": 1, "batch_size": BATCH, "lr": LR,
                                            "optimizer": "sgd", "momentum": 0.0}},
    "aggregator": {"type": "fedavg"},
}


def run_oiafed(seed: int, checkpoint_every: int = 1) -> tuple[float, float]:
    """One ``oiafed.run``; returns (``Trainer.fit`` seconds, final test accuracy)."""
    config = {**CONFIG, "seed": seed, "runtime": {"checkpoint_every": checkpoint_every}}
    with tempfile.TemporaryDirectory() as tmp:
        result = oiafed.run(config, run_dir=tmp)
    return result.wall_time, result.history[-1]["accuracy"]


def run_oiafed_stateless(seed: int) -> tuple[float, float]:
    """``oiafed.run`` without the per-round resumable state file (``checkpoint_every: 0``)."""
    return run_oiafed(seed, checkpoint_every=0)


def run_plain(seed: int) -> tuple[float, float]:
    """The same FedAvg run by hand; returns (round-loop seconds, final test accuracy)."""
    digits = load_digits()
    x_all = torch.as_tensor(digits.data.astype(np.float32) / 16.0)
    y_all = torch.as_tensor(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(y_all)), test_size=TEST_FRACTION,
                                           stratify=digits.target, random_state=seed)
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    x_test, y_test = x_all[test_idx], y_all[test_idx]
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y_train)), CLIENTS)
    clients = [(x_train[p], y_train[p]) for p in parts]

    torch.manual_seed(seed)
    global_model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    local = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    generator = torch.Generator().manual_seed(seed)

    history = []
    started = time.perf_counter()
    for _ in range(ROUNDS):
        global_state = global_model.state_dict()
        states, sizes, train_acc, train_loss = [], [], 0.0, 0.0
        for x, y in clients:
            local.load_state_dict(global_state)
            local.train()
            optimizer = torch.optim.SGD(local.parameters(), lr=LR)
            n = len(y)
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, BATCH):
                index = order[start:start + BATCH]
                xb, yb = x[index], y[index]
                optimizer.zero_grad(set_to_none=True)
                logits = local(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                optimizer.step()
                train_loss += loss.item() * len(index)
                train_acc += (logits.argmax(dim=1) == yb).sum().item()
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            sizes.append(n)
        total = sum(sizes)
        train_metrics = {"train_accuracy": train_acc / total, "train_loss": train_loss / total}
        global_model.load_state_dict({
            k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in global_state
        })
        global_model.eval()
        with torch.inference_mode():
            logits = global_model(x_test)
            test_loss = float(F.cross_entropy(logits, y_test))
            accuracy = float((logits.argmax(dim=1) == y_test).float().mean())
        global_model.train()
        history.append({**train_metrics, "loss": test_loss, "accuracy": accuracy})
    return time.perf_counter() - started, history[-1]["accuracy"]


def timed(fn, seed: int) -> tuple[float, float, float]:
    """(end-to-end seconds, training-loop seconds, final accuracy) of one call."""
    started = time.perf_counter()
    loop, accuracy = fn(seed)
    return time.perf_counter() - started, loop, accuracy


def summary(label: str, columns: dict[str, list[float]]) -> None:
    plain = statistics.median(columns["plain"])
    print(f"{label}:")
    for name, values in columns.items():
        median = statistics.median(values)
        ratio = "" if name == "plain" else f"  ratio {median / plain:.3f}"
        print(f"  {name:<24} median {median:.3f} s  min {min(values):.3f} s{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of each (10)")
    parser.add_argument("--seed", type=int, default=0, help="experiment seed (0)")
    args = parser.parse_args()

    runners = {"oiafed (defaults)": run_oiafed, "oiafed (checkpoint_every 0)": run_oiafed_stateless,
               "plain": run_plain}
    for fn in runners.values():  # warm-up: torch's first optimizer step, lazy imports
        fn(args.seed)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runners}
    for rep in range(args.reps):
        order = list(runners)[rep % len(runners):] + list(runners)[:rep % len(runners)]
        for name in order:
            times[name].append(timed(runners[name], args.seed))

    print(f"{ROUNDS} rounds x {CLIENTS} clients, digits, MLP 64-64-10, {args.reps} reps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for column, label in ((0, "end to end"), (1, "training loop only")):
        summary(label, {name: [t[column] for t in rows] for name, rows in times.items()})
    print("final test accuracy: " + ", ".join(
        f"{name} {statistics.median(t[2] for t in rows):.4f}" for name, rows in times.items()
    ))


if __name__ == "__main__":
    main()
