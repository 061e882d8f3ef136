"""FedAvg on MNIST as published (McMahan et al., AISTATS 2017), and oiafed against a
hand-written PyTorch FedAvg loop doing the same training.

The workload is the paper's Table 2 row "FedAvg, E = 5, B = 10" for its CNN: 100 clients of
600 MNIST training images (IID, or the pathological non-IID shards), C = 0.1 (10 clients a
round), 5 local epochs of plain SGD on minibatches of 10, the global model evaluated on the
official 10,000 test images after every round. oiafed runs ``examples/fedavg_mnist_iid.yaml``
and ``examples/fedavg_mnist_noniid.yaml`` unchanged but for the data folder, the learning
rate, the seed and the number of rounds (overrides).

Commands (each writes one JSON per run under ``benchmarks/results/fedavg_mnist/`` and skips a
run whose file exists, so an interrupted command picks up where it stopped):

* ``grid``: oiafed on IID MNIST at each learning rate of a multiplicative grid of resolution
  10^(1/3) (the paper tunes its learning rates on such grids), each run stopped when the test
  accuracy reaches 99 %, after ``--rounds`` rounds, or at the round where an earlier learning
  rate of the grid reached 99 % (it can no longer be the fastest);
* ``reach``: oiafed on IID MNIST at each given learning rate, each run on its own until the
  test accuracy reaches 99 % or ``--rounds`` rounds pass: the rounds each learning rate takes
  (no cut at an earlier one's round, unlike ``grid``);
* ``noniid``: oiafed on the pathological non-IID partition at one learning rate, every round
  recorded;
* ``compare``: per seed, oiafed and the plain loop (``PlainFedAvg``) on IID MNIST,
  alternating round by round in one process (each oiafed round is followed by one plain
  round, so both run under the same load); per-round seconds and test accuracy of both;
* ``table``: the markdown tables of the README from the JSON files.

The plain loop shares no code with oiafed: its own CNN definition (the same layers), IID
partition, client sampling, data order and initialisation from the seed. Every client of a
round starts from the same global weights (``load_state_dict`` copies them into the working
model; ``tests/test_fedavg_paper.py`` checks the round against clients trained from separate
copies). Its work is oiafed's: per client 5 shuffled epochs of batch-10 SGD with the running
training loss and accuracy, a sample-weighted mean of the clients' weights, then the test
loss and accuracy in batches of 1,024.

Run from the repository root (``--mnist-root`` defaults to ``../shared/data/mnist``):

    .venv/bin/python benchmarks/fedavg_mnist.py grid --lrs 0.1 0.215 0.464 0.0464
    .venv/bin/python benchmarks/fedavg_mnist.py reach --lrs 0.215 0.1 0.0464 --rounds 60
    .venv/bin/python benchmarks/fedavg_mnist.py compare --lr 0.1 --seeds 0 1 2 --rounds 3
    .venv/bin/python benchmarks/fedavg_mnist.py noniid --lr 0.215 --rounds 20
    .venv/bin/python benchmarks/fedavg_mnist.py table

One torch thread by default (``--threads``): on a 2-core machine shared with other jobs, a
second thread mostly waits for a core; both sides of ``compare`` run with the same setting.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import oiafed

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fedavg_mnist"
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
EXAMPLES = {"iid": REPO / "examples" / "fedavg_mnist_iid.yaml",
            "noniid": REPO / "examples" / "fedavg_mnist_noniid.yaml"}
TARGET = 0.99
CLIENTS, CLIENTS_PER_ROUND, EPOCHS, BATCH, EVAL_BATCH = 100, 10, 5, 10, 1024
PAPER = {"iid": 20, "noniid": 229}
"""Rounds to 99 % test accuracy in the paper, Table 2 (CNN, FedAvg, E = 5, B = 10, u = 300)."""

log = logging.getLogger("fedavg_mnist")
Weights = dict[str, torch.Tensor]


# -- the hand-written loop ------------------------------------------------------------------


def paper_cnn() -> nn.Sequential:
    """The paper's CNN written out: 5x5 convolutions of 32 and 64 channels, each with ReLU and
    2x2 max pooling, 512 fully connected units with ReLU, 10 outputs (1,663,370 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def weighted_mean(states: Sequence[Weights], sizes: Sequence[int]) -> Weights:
    """FedAvg's aggregate (the paper's Algorithm 1): sum over clients of n_k / n * w_k."""
    total = sum(sizes)
    return {name: sum((state[name] * (size / total) for state, size in
                       zip(states, sizes, strict=True)), torch.zeros_like(states[0][name]))
            for name in states[0]}


class PlainFedAvg:
    """FedAvg by hand: each round, ``clients_per_round`` clients drawn without replacement
    train from the same global weights; the new global model is their sample-weighted mean.

    Args:
        clients: each client's ``(x, y)`` training tensors.
        test: the global test set ``(x, y)``.
        model_fn: builds the model (called once: the global weights' initial values and the
            working model every client trains in turn).
    """

    def __init__(self, clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 test: tuple[torch.Tensor, torch.Tensor], *, lr: float, seed: int,
                 model_fn: Callable[[], nn.Module] = paper_cnn, epochs: int = EPOCHS,
                 batch_size: int = BATCH, clients_per_round: int = CLIENTS_PER_ROUND) -> None:
        self.clients, self.test = clients, test
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.clients_per_round = clients_per_round
        torch.manual_seed(seed)
        self.model = model_fn()
        self.global_weights: Weights = {k: v.detach().clone()
                                        for k, v in self.model.state_dict().items()}
        self.sampler = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def client_update(self, start: Weights, x: torch.Tensor,
                      y: torch.Tensor) -> tuple[Weights, float, int]:
        """Train the working model from ``start`` (copied in) on one client's data; its new
        weights, summed training loss and correct predictions."""
        model = self.model
        model.load_state_dict(start)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        loss_sum, correct = 0.0, 0
        for _ in range(self.epochs):
            order = torch.randperm(len(y), generator=self.generator)
            for first in range(0, len(y), self.batch_size):
                index = order[first:first + self.batch_size]
                xb, yb = x[index], y[index]
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(index)
                correct += int((logits.argmax(dim=1) == yb).sum().item())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, loss_sum, correct

    def round(self) -> dict[str, Any]:
        """One round; returns the chosen clients, their training loss and accuracy (over every
        local step) and the test metrics of the new global model."""
        chosen = sorted(self.sampler.choice(len(self.clients), self.clients_per_round,
                                            replace=False).tolist())
        start = self.global_weights
        trained = [self.client_update(start, *self.clients[c]) for c in chosen]
        sizes = [len(self.clients[c][1]) for c in chosen]
        self.global_weights = weighted_mean([t[0] for t in trained], sizes)
        seen = self.epochs * sum(sizes)
        return {"clients": chosen, "train_loss": sum(t[1] for t in trained) / seen,
                "train_accuracy": sum(t[2] for t in trained) / seen, **self.evaluate()}

    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy of the global weights (batches of ``EVAL_BATCH``)."""
        model = self.model
        model.load_state_dict(self.global_weights)
        model.eval()
        x, y = self.test
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for first in range(0, len(y), EVAL_BATCH):
                logits = model(x[first:first + EVAL_BATCH])
                loss_sum += float(F.cross_entropy(logits, y[first:first + EVAL_BATCH],
                                                  reduction="sum"))
                correct += int((logits.argmax(dim=1) == y[first:first + EVAL_BATCH]).sum())
        return {"accuracy": correct / len(y), "loss": loss_sum / len(y)}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not), as an array of its shape."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(root: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's ``train`` or ``t10k`` images (N x 1 x 28 x 28, in [0, 1]) and labels."""
    def find(stem: str) -> Path:
        return next(p for p in (root / stem, root / f"{stem}.gz") if p.is_file())

    x = read_idx(find(f"{part}-images-idx3-ubyte")).astype(np.float32)[:, None] / 255.0
    y = read_idx(find(f"{part}-labels-idx1-ubyte")).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def plain_iid(root: Path, lr: float, seed: int) -> PlainFedAvg:
    """The plain loop on MNIST: the training images dealt out IID, 600 to each client."""
    x, y = load_mnist(root, "train")
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), CLIENTS)
    clients = [(x[p], y[p]) for p in (torch.from_numpy(np.sort(p)) for p in parts)]
    return PlainFedAvg(clients, load_mnist(root, "t10k"), lr=lr, seed=seed)


# -- oiafed runs ----------------------------------------------------------------------------


class Interleave(oiafed.Callback):
    """Records each oiafed round (its seconds: from the end of the previous round, less the
    plain round run there) and, with a plain loop, runs one plain round after it; stops the
    run at ``stop_at`` test accuracy; hands the rows so far to ``on_row`` after each round."""

    def __init__(self, plain: PlainFedAvg | None = None, stop_at: float | None = None,
                 on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.plain, self.stop_at, self.on_row = plain, stop_at, on_row
        self.rows: list[dict[str, Any]] = []
        self.mark = 0.0

    async def on_train_start(self, trainer: Any, **kwargs: Any) -> None:
        self.mark = time.perf_counter()

    async def on_round_end(self, trainer: Any, round_num: int, result: Any,
                           **kwargs: Any) -> None:
        oiafed_seconds = time.perf_counter() - self.mark
        metrics = result.metrics
        row: dict[str, Any] = {"round": round_num, "accuracy": metrics["accuracy"],
                               "loss": metrics["loss"], "seconds": oiafed_seconds,
                               "trainer_round_time": metrics["round_time"]}
        if self.plain is not None:
            started = time.perf_counter()
            plain = self.plain.round()
            row["plain"] = {"accuracy": plain["accuracy"], "loss": plain["loss"],
                            "seconds": time.perf_counter() - started}
        self.rows.append(row)
        log.info("round %d: %s", round_num, json.dumps(row))
        if self.on_row is not None:
            self.on_row(self.rows)
        if self.stop_at is not None and metrics["accuracy"] >= self.stop_at:
            trainer.should_stop = True
        self.mark = time.perf_counter()


def rounds_to(rows: Sequence[dict[str, Any]], target: float = TARGET) -> int | None:
    """The first round whose test accuracy reaches ``target`` (None if none does)."""
    return next((row["round"] for row in rows if row["accuracy"] >= target), None)


def machine() -> dict[str, Any]:
    """Where and when: date, CPU, torch version and threads, commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit}


def save(name: str, record: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    path.with_suffix(".tmp").replace(path)


def finished(name: str) -> bool:
    """Whether the run ``name`` has a complete record (an interrupted one is run again)."""
    path = RESULTS / name
    return path.exists() and json.loads(path.read_text()).get("complete", True)


def measured_run(name: str, kind: str, partition: str, root: Path, *, lr: float, seed: int,
                 rounds: int, plain: PlainFedAvg | None = None,
                 stop_at: float | None = None) -> None:
    """One oiafed run of the example config (overridden: data folder, lr, seed, rounds), its
    record saved after every round (``complete`` once the run ends)."""
    header = {"kind": kind, "partition": partition, "lr": lr, "seed": seed,
              "max_rounds": rounds, "machine": machine()}

    def record(rows: list[dict[str, Any]], complete: bool) -> None:
        save(name, {**header, "complete": complete, "rounds_to_99": rounds_to(rows),
                    "rows": rows})

    recorder = Interleave(plain, stop_at, on_row=lambda rows: record(rows, False))
    overrides = {"data.args.root": str(root), "learner.args.lr": lr, "seed": seed,
                 "trainer.args.rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        oiafed.run(str(EXAMPLES[partition]), run_dir=Path(tmp) / "run", overrides=overrides,
                   callbacks=[recorder])
    record(recorder.rows, True)
    log.info("wrote %s", RESULTS / name)


def command_grid(args: argparse.Namespace) -> None:
    """Each learning rate runs until 99 % or ``--rounds``, or until the round at which an
    earlier one reached 99 % (it can no longer be the fastest)."""
    for lr in args.lrs:
        name = f"grid_iid_lr{lr:g}.json"
        if finished(name):
            continue
        reached = [r["rounds_to_99"] for r in load_records("grid")
                   if r["rounds_to_99"] is not None]
        measured_run(name, "grid", "iid", args.mnist_root, lr=lr, seed=args.seed,
                     rounds=min([args.rounds, *reached]), stop_at=TARGET)


def command_reach(args: argparse.Namespace) -> None:
    """Each learning rate runs until 99 % or ``--rounds``, whatever the others took."""
    for lr in args.lrs:
        name = f"reach_iid_lr{lr:g}" + (f"_seed{args.seed}" if args.seed else "") + ".json"
        if finished(name):
            done = json.loads((RESULTS / name).read_text())
            if done["rounds_to_99"] is not None or done["max_rounds"] >= args.rounds:
                continue  # reached, or not within as many rounds as asked now
        measured_run(name, "reach", "iid", args.mnist_root, lr=lr, seed=args.seed,
                     rounds=args.rounds, stop_at=TARGET)


def command_noniid(args: argparse.Namespace) -> None:
    name = f"noniid_lr{args.lr:g}_rounds{args.rounds}.json"
    if not finished(name):
        measured_run(name, "noniid", "noniid", args.mnist_root, lr=args.lr, seed=args.seed,
                     rounds=args.rounds)


def command_compare(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        name = f"compare_iid_lr{args.lr:g}_seed{seed}.json"
        if not finished(name):
            measured_run(name, "compare", "iid", args.mnist_root, lr=args.lr, seed=seed,
                         rounds=args.rounds, plain=plain_iid(args.mnist_root, args.lr, seed))


def load_records(kind: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{kind}_*.json"))]


def fmt_rounds(record: dict[str, Any]) -> str:
    reached = record["rounds_to_99"]
    last = record["rows"][-1]
    cut = "" if record.get("complete", True) else ", interrupted"
    return (str(reached) if reached is not None
            else f"not in {last['round']} (at {last['round']}: {100 * last['accuracy']:.2f} %{cut})")


def command_table(args: argparse.Namespace) -> None:
    lines = ["Learning-rate grid (IID, seed 0; a run stops at 99 % test accuracy; the best "
             "reaches 99 % in the fewest rounds, else the highest accuracy in 20):", "",
             "| lr | rounds to 99 % | accuracy by round (%) | machine |", "|---|---|---|---|"]
    for rec in sorted(load_records("grid"), key=lambda r: r["lr"]):
        curve = " ".join(f"{100 * row['accuracy']:.2f}" for row in rec["rows"])
        lines.append(f"| {rec['lr']:g} | {fmt_rounds(rec)} | {curve} | "
                     f"{rec['machine']['date']}, {rec['machine']['threads']} threads |")
    reach = sorted(load_records("reach"), key=lambda r: r["lr"])
    if reach:
        lines += ["", "Rounds each learning rate takes to 99 % (IID; each run on its own, "
                  "stopped at 99 % or its round cap):", "",
                  "| lr | seed | rounds to 99 % | accuracy at round 20 (%) | best accuracy (%) | "
                  "machine |", "|---|---|---|---|---|---|"]
        for rec in reach:
            rows = rec["rows"]
            at_20 = f"{100 * rows[19]['accuracy']:.2f}" if len(rows) >= 20 else "-"
            best = max(rows, key=lambda row: row["accuracy"])
            lines.append(f"| {rec['lr']:g} | {rec['seed']} | {fmt_rounds(rec)} "
                         f"(cap {rec['max_rounds']}) | "
                         f"{at_20} | {100 * best['accuracy']:.2f} (round {best['round']}) | "
                         f"{rec['machine']['date']}, {rec['machine']['threads']} threads |")
    for rec in load_records("noniid"):
        curve = " ".join(f"{100 * row['accuracy']:.2f}" for row in rec["rows"])
        lines += ["", f"Pathological non-IID, lr {rec['lr']:g}, seed {rec['seed']}: rounds to "
                  f"99 %: {fmt_rounds(rec)}; accuracy by round (%): {curve}"]
    compares = load_records("compare")
    if compares:
        lines += ["", "oiafed against the plain loop, alternating round by round (IID):", "",
                  "| seed | lr | rounds | oiafed s/round (median) | plain s/round (median) | "
                  "ratio | oiafed accuracy by round (%) | plain accuracy by round (%) |",
                  "|---|---|---|---|---|---|---|---|"]
        ratios = []
        for rec in compares:
            rows = rec["rows"]
            ours = statistics.median(r["seconds"] for r in rows)
            plain = statistics.median(r["plain"]["seconds"] for r in rows)
            ratios += [r["seconds"] / r["plain"]["seconds"] for r in rows]
            lines.append(
                f"| {rec['seed']} | {rec['lr']:g} | {len(rows)} | {ours:.2f} | {plain:.2f} | "
                f"{ours / plain:.3f} | "
                + " ".join(f"{100 * r['accuracy']:.2f}" for r in rows) + " | "
                + " ".join(f"{100 * r['plain']['accuracy']:.2f}" for r in rows) + " |")
        ours_total = sum(r["seconds"] for rec in compares for r in rec["rows"])
        plain_total = sum(r["plain"]["seconds"] for rec in compares for r in rec["rows"])
        lines += ["", f"median of the per-round ratios over every seed: "
                  f"{statistics.median(ratios):.3f} ({len(ratios)} rounds); total seconds "
                  f"{ours_total:.0f} / {plain_total:.0f} = {ours_total / plain_total:.3f}"]
        lines += spread_lines(compares)
    text = "\n".join(lines) + "\n"
    (RESULTS / "tables.md").write_text(text)
    print(text)


def spread_lines(compares: list[dict[str, Any]]) -> list[str]:
    """Per round: the test accuracy's min-max over the seeds, plain loop and oiafed, and
    whether oiafed's mean lies in the plain loop's range."""
    rounds = min(len(rec["rows"]) for rec in compares)
    out = ["", f"Spread over {len(compares)} seeds:", "",
           "| round | plain min-max (%) | oiafed min-max (%) | oiafed mean (%) | "
           "mean inside plain's range |", "|---|---|---|---|---|"]
    for i in range(rounds):
        plain = [rec["rows"][i]["plain"]["accuracy"] for rec in compares]
        ours = [rec["rows"][i]["accuracy"] for rec in compares]
        mean = statistics.mean(ours)
        inside = "yes" if min(plain) <= mean <= max(plain) else "no"
        out.append(f"| {i + 1} | {100 * min(plain):.2f}-{100 * max(plain):.2f} | "
                   f"{100 * min(ours):.2f}-{100 * max(ours):.2f} | {100 * mean:.2f} | "
                   f"{inside} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-root", type=Path, default=DEFAULT_MNIST,
                        help="folder of MNIST's four IDX files (../shared/data/mnist)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of grid, reach and noniid (0)")
    sub = parser.add_subparsers(dest="command", required=True)
    grid = sub.add_parser("grid", help="IID learning-rate grid")
    grid.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.215, 0.464, 0.0464])
    grid.add_argument("--rounds", type=int, default=20)
    reach = sub.add_parser("reach", help="rounds each IID learning rate takes to 99 %")
    reach.add_argument("--lrs", type=float, nargs="+", default=[0.215, 0.1, 0.0464])
    reach.add_argument("--rounds", type=int, default=60)
    noniid = sub.add_parser("noniid", help="the non-IID curve at one learning rate")
    noniid.add_argument("--lr", type=float, required=True)
    noniid.add_argument("--rounds", type=int, default=20)
    compare = sub.add_parser("compare", help="oiafed against the plain loop, per seed")
    compare.add_argument("--lr", type=float, required=True)
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    compare.add_argument("--rounds", type=int, default=20)
    sub.add_parser("table", help="markdown tables from the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    commands = {"grid": command_grid, "reach": command_reach, "noniid": command_noniid,
                "compare": command_compare, "table": command_table}
    commands[args.command](args)


if __name__ == "__main__":
    main()
