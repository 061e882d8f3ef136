"""Population scale: seconds per round and peak memory for 100 to 100,000 clients.

For each workload, each federation size (total clients; 100 sampled per round) and each way of
running it, one fresh subprocess runs a few rounds and reports:

* ``s/round``: the median trainer ``round_time`` of rounds 2.. (round 1 is warm-up: lazy
  imports, worker start-up). It covers selection, local training, aggregation, evaluation of
  the global model and the round-end hooks; the metrics line and checkpoint written after each
  round are not in it. The plain loop times the same steps.
* ``RSS main``: the subprocess's peak resident memory (``VmHWM``: ``getrusage`` would
  carry the launching process's peak across ``exec``);
  ``RSS tree``: the peak of main + every descendant process (workers, Ray's daemons), sampled
  every 0.25 s with psutil, for the modes that start processes (else = main).

Ways of running it: ``serial``, ``parallel`` and ``ray`` (oiafed runtimes; ``--workers``
processes or actors, one torch thread each) and ``plain``, a hand-written PyTorch FedAvg loop
over the same data (oiafed's LEAF generator) and model. A runtime that does not import yet is
listed as n/a. Serial and plain use one torch thread. ``speedup vs serial`` is serial's
s/round over the row's: the parallel speedup, or for ``plain`` oiafed's overhead factor.

Workloads, both on LEAF Synthetic(0.5, 0.5) with 50 samples per client (40 train, 10 held out;
the global test set is 100 clients' held-out data), with the quickstart's learner (2 local
epochs, batch 32, SGD lr 0.05 momentum 0.9) and FedAvg:

* ``quickstart``: 60 features, 10 classes, the quickstart's MLP (one hidden layer of 64);
* ``cnn``: 64 features shaped 1 x 8 x 8, oiafed's ``cnn`` (conv 32, conv 64, dense 128).

Goals (issue "population scale"): round time at 100,000 clients <= 1.2 x at 100; peak RSS at
100,000 clients <= 1 GB; parallel speedup over serial >= 1.6 x on 2 cores.

Run from the repository root:

    .venv/bin/python benchmarks/scale.py                 # the full table (several minutes)
    .venv/bin/python benchmarks/scale.py --quick         # smoke run: 2 sizes, 3 rounds, 20 sampled
    .venv/bin/python benchmarks/scale.py --modes serial plain --workloads cnn
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

MODES = ("serial", "parallel", "ray", "plain")
SIZES = (100, 10_000, 100_000)
SEED = 0
LEARNER = {"epochs": 2, "batch_size": 32, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9}
WORKLOADS: dict[str, dict[str, Any]] = {
    "quickstart": {
        "data": {"num_features": 60, "num_classes": 10, "samples_per_client": 50},
        "model": {"type": "mlp", "args": {"hidden": [64]}},
    },
    "cnn": {
        "data": {"num_features": 64, "num_classes": 10, "samples_per_client": 50,
                 "shape": [1, 8, 8]},
        "model": {"type": "cnn", "args": {"channels": [32, 64], "hidden": 128}},
    },
}


# -- what runs in each subprocess ---------------------------------------------------------------


def oiafed_config(job: dict[str, Any]) -> dict[str, Any]:
    workload = WORKLOADS[job["workload"]]
    runtime: dict[str, Any] = {"mode": job["mode"]}
    if job["mode"] in ("parallel", "ray"):
        runtime.update(workers=job["workers"], threads=1)
    return {
        "name": f"scale-{job['workload']}-{job['mode']}-{job['clients']}",
        "seed": SEED,
        "data": {"type": "synthetic", "num_clients": job["clients"],
                 "args": copy.deepcopy(workload["data"])},
        "model": copy.deepcopy(workload["model"]),
        "trainer": {"args": {"rounds": job["rounds"], "clients_per_round": job["sampled"],
                             "eval_every": 1}},
        "learner": {"args": dict(LEARNER)},
        "aggregator": {"type": "fedavg"},
        "runtime": runtime,
    }


def run_oiafed(job: dict[str, Any]) -> tuple[list[float], float]:
    import oiafed

    with tempfile.TemporaryDirectory() as tmp:
        result = oiafed.run(oiafed_config(job), run_dir=tmp)
    return [row["round_time"] for row in result.history], result.history[-1]["accuracy"]


def plain_model(workload: str):
    """The workload's model, written out in PyTorch (same layers as oiafed's builders)."""
    from torch import nn

    if workload == "quickstart":
        return nn.Sequential(nn.Linear(60, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def run_plain(job: dict[str, Any]) -> tuple[list[float], float]:
    """FedAvg by hand: sample, train each client (2 epochs of SGD, tracking its loss and
    accuracy as every client reports them), average, evaluate."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from oiafed.data.leaf import LeafSynthetic

    data = LeafSynthetic(SEED, job["clients"], **WORKLOADS[job["workload"]]["data"])
    torch.manual_seed(SEED)
    model = plain_model(job["workload"])
    local = copy.deepcopy(model)
    times, accuracy = [], float("nan")
    for round_num in range(1, job["rounds"] + 1):
        started = time.perf_counter()
        gen = np.random.default_rng([SEED, round_num])
        picked = sorted(gen.choice(job["clients"], size=job["sampled"], replace=False).tolist())
        start_weights = {k: v.clone() for k, v in model.state_dict().items()}
        summed = {k: torch.zeros_like(v) for k, v in start_weights.items()}
        total, train_correct, train_loss = 0, 0, 0.0
        for index in picked:
            client = data.client_data(f"client_{index}")
            local.load_state_dict(start_weights)
            optimizer = torch.optim.SGD(local.parameters(), lr=LEARNER["lr"],
                                        momentum=LEARNER["momentum"])
            generator = torch.Generator().manual_seed(round_num * 1_000_003 + index)
            n = len(client)
            for _ in range(LEARNER["epochs"]):
                order = torch.randperm(n, generator=generator)
                loss_sum, correct = 0.0, 0  # the local metrics a client reports, as oiafed's
                for begin in range(0, n, LEARNER["batch_size"]):
                    batch = order[begin:begin + LEARNER["batch_size"]]
                    x, y = client.x[batch], client.y[batch]
                    optimizer.zero_grad(set_to_none=True)
                    logits = local(x)
                    loss = F.cross_entropy(logits, y)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.item() * len(batch)
                    correct += (logits.argmax(dim=1) == y).sum().item()
            train_correct += correct  # the last epoch's, as oiafed's round metrics
            train_loss += loss_sum
            for k, v in local.state_dict().items():
                summed[k] += v.detach() * n
            total += n
        model.load_state_dict({k: v / total for k, v in summed.items()})
        train_correct / total, train_loss / total  # the round's train metrics, as oiafed's
        with torch.no_grad():
            logits = model(data.test.x)
            F.cross_entropy(logits, data.test.y)
            accuracy = float((logits.argmax(1) == data.test.y).float().mean())
        times.append(time.perf_counter() - started)
    return times, accuracy


class TreeRss:
    """Samples the summed RSS of this process and all its descendants (psutil), in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        try:
            import psutil  # noqa: F401
        except ImportError as exc:  # never report the main process's memory as the tree's
            raise SystemExit("the RSS tree needs psutil: .venv/bin/pip install psutil") from exc
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (its own, not its launcher's)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    sample_tree = job["mode"] in ("parallel", "ray")
    tree = TreeRss() if sample_tree else None
    if tree is not None:
        tree.__enter__()
    try:
        times, accuracy = run_plain(job) if job["mode"] == "plain" else run_oiafed(job)
    finally:
        if tree is not None:
            tree.__exit__()
    main = peak_rss()
    return {
        "round_times": times,
        "sec_per_round": statistics.median(times[1:] if len(times) > 1 else times),
        "rss_main": main,
        "rss_tree": max(main, tree.peak) if tree is not None else main,
        "accuracy": accuracy,
    }


# -- the driver ---------------------------------------------------------------------------------


def available(mode: str) -> str | None:
    """None if ``mode`` can run here, else why not."""
    if mode in ("serial", "plain"):
        return None
    try:
        importlib.import_module(f"oiafed.runtime.{mode}")
        if mode == "ray":
            importlib.import_module("ray")
    except Exception as exc:  # a runtime in progress may fail in any way
        return f"{type(exc).__name__}: {exc}"
    return None


def measure(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 and 10,000 clients, 3 rounds, 20 sampled")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 6)")
    parser.add_argument("--sampled", type=int, default=None, help="clients per round (100)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="total clients")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--workers", type=int, default=2, help="parallel/ray workers (2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rounds = args.rounds or (3 if args.quick else 6)
    sampled = args.sampled or (20 if args.quick else 100)
    sizes = args.sizes or ([100, 10_000] if args.quick else list(SIZES))
    print(f"# oiafed scale benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"{rounds} rounds, {sampled} sampled per round, workers={args.workers}")
    missing = {mode: available(mode) for mode in args.modes}
    for mode, why in missing.items():
        if why:
            print(f"# {mode}: n/a ({why})")
    rows: list[dict[str, Any]] = []
    for workload in args.workloads:
        for size in sizes:
            for mode in args.modes:
                row = {"workload": workload, "mode": mode, "clients": size}
                if not missing[mode]:
                    job = {**row, "rounds": rounds, "sampled": sampled, "workers": args.workers}
                    row.update(measure(job, args.timeout))
                rows.append(row)
                print("# " + json.dumps(row), flush=True)
    print_table(rows, args.modes, sizes)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


def print_table(rows: list[dict[str, Any]], modes: list[str], sizes: list[int]) -> None:
    def find(workload: str, mode: str, size: int) -> dict[str, Any]:
        return next(r for r in rows if (r["workload"], r["mode"], r["clients"]) == (workload, mode, size))

    print()
    print("| workload | mode | clients | s/round | x vs smallest | speedup vs serial "
          "| RSS main MB | RSS tree MB | accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        seconds = row.get("sec_per_round")
        if seconds is None:
            note = row.get("error", "n/a")
            print(f"| {row['workload']} | {row['mode']} | {row['clients']:,} | n/a | | | | | "
                  f"{note[:60]} |")
            continue
        base = find(row["workload"], row["mode"], sizes[0]).get("sec_per_round")
        serial = find(row["workload"], "serial", row["clients"]).get("sec_per_round") \
            if "serial" in modes else None
        ratio = f"{seconds / base:.2f}" if base else ""
        speedup = f"{serial / seconds:.2f}" if serial and row["mode"] != "serial" else ""
        print(f"| {row['workload']} | {row['mode']} | {row['clients']:,} | {seconds:.3f} | "
              f"{ratio} | {speedup} | {mb(row['rss_main'])} | {mb(row['rss_tree'])} | "
              f"{row['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
