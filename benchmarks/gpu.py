"""oiafed on an accelerator: the FedAvg paper's MNIST CNN round against a hand-written loop.

Workload (McMahan et al. 2017, MNIST CNN): 10 IID clients, E=5 local epochs, B=10, SGD lr
0.05; the model is oiafed's built-in ``cnn`` with channels 32, 64 and a 512-unit head (3x3
convolutions where the paper has 5x5). The data is the real MNIST (``--root``, default
``../shared/data/mnist``), ``--per-client`` training images per client (600 = the paper's
60,000 / 100 clients; the subset is written as IDX files into a temporary folder so that
every worker process reads the same data).

Measured on ``--device`` (default ``auto``):

* the serial round: oiafed (``runtime.mode: serial``) against a hand-written PyTorch loop
  training the same clients' data (oiafed's partitions) from the same global model and
  averaging the weights; seconds per round (median of the rounds but the last, which also
  evaluates), and the GPU utilisation sampled during oiafed's rounds
  (``torch.cuda.utilization()``, else ``nvidia-smi``; n/a without either);
* the parallel runtime with ``--workers`` (default 1, 2, 4, 8) worker processes sharing the
  GPU(s) round-robin: seconds per round.

The figures, the machine, the date and the command go to ``--out`` (default
``benchmarks/results/gpu``) as ``<device type>.json``.

Without a GPU it says so and exits 0, unless ``--device cpu`` is given (the CPU path; use
``--quick`` for tiny sizes). Run from the repository root:

    .venv/bin/python benchmarks/gpu.py                      # on a CUDA machine
    .venv/bin/python benchmarks/gpu.py --device cpu --quick # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

import oiafed
from oiafed.config import load_config
from oiafed.data.datasets import _find, _read_idx
from oiafed.data.federated import build_federated_data
from oiafed.device import device_name, resolve_device
from oiafed.runtime.worker import build_model

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def write_subset(root: Path, count: int, folder: Path, seed: int = 0) -> None:
    """The first ``count`` images of a seeded shuffle of MNIST's training set, as IDX files."""
    images = _read_idx(_find(root, "train-images-idx3-ubyte"))
    labels = _read_idx(_find(root, "train-labels-idx1-ubyte"))
    pick = np.random.default_rng(seed).permutation(len(labels))[:count]
    for name, array, magic in (("train-images-idx3-ubyte", images[pick], 0x803),
                               ("train-labels-idx1-ubyte", labels[pick], 0x801)):
        header = np.array([magic, *array.shape], dtype=">u4").tobytes()
        with gzip.open(folder / f"{name}.gz", "wb", compresslevel=1) as out:
            out.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def config(root: Path, args: argparse.Namespace, **runtime: Any) -> dict[str, Any]:
    return {
        "name": "gpu-bench", "seed": 0, "device": args.device,
        "data": {"type": "mnist", "args": {"root": str(root), "split": "train"},
                 "num_clients": args.clients, "test_fraction": 0.1},
        "model": {"type": "cnn", "args": {"channels": [32, 64], "hidden": 512}},
        "trainer": {"args": {"rounds": args.rounds, "eval_every": 10**6}},
        "learner": {"args": {"epochs": args.epochs, "batch_size": args.batch, "lr": 0.05}},
        "runtime": {"checkpoint_every": 0, **runtime},
    }


def round_times(history: list[dict[str, Any]]) -> float:
    times = [row["round_time"] for row in history]
    return statistics.median(times[:-1] if len(times) > 1 else times)


class Utilisation:
    """Samples the GPU's utilisation (%) every 0.1 s in a thread while in ``with`` (each
    ``with`` adds to the same samples)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits", "-i",
                                  str(self.device.index or 0)],
                                 capture_output=True, text=True, timeout=5, check=True)
            return float(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            value = self._read()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> Utilisation:
        if self.device.type == "cuda":
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def text(self) -> str:
        return f"{statistics.mean(self.samples):.0f} %" if self.samples else "n/a"


def plain_rounds(cfg_dict: dict[str, Any], device: torch.device, rounds: int) -> float:
    """The same training by hand: per round, every client trains E epochs of SGD from the
    global model on its (device-resident) data, then the weights are averaged by samples."""
    cfg = load_config(cfg_dict)
    data = build_federated_data(cfg.data, cfg.seed)
    model = build_model(cfg, data).to(device)
    local = build_model(cfg, data).to(device)
    shards = [data.client_data(cid) for cid in data.client_ids]
    shards = [(s.x.to(device), s.y.to(device)) for s in shards]
    epochs, batch = cfg.learner.args["epochs"], cfg.learner.args["batch_size"]
    times = []
    for round_num in range(rounds):
        started = time.perf_counter()
        total = sum(len(y) for _, y in shards)
        summed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        for i, (x, y) in enumerate(shards):
            local.load_state_dict(model.state_dict())
            optimizer = torch.optim.SGD(local.parameters(), lr=0.05)
            generator = torch.Generator().manual_seed(round_num * 1000 + i)
            for _ in range(epochs):
                order = torch.randperm(len(y), generator=generator).to(device)
                for start in range(0, len(y), batch):
                    index = order[start:start + batch]
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(local(x[index]), y[index]).backward()
                    optimizer.step()
            for k, v in local.state_dict().items():
                summed[k] += v * (len(y) / total)
        model.load_state_dict(summed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[:-1] if len(times) > 1 else times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MNIST IDX folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=None, help="images per client")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", default=None, help="comma-separated (default 1,2,4,8)")
    parser.add_argument("--reps", type=int, default=1,
                        help="interleaved repetitions of the serial comparison")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    explicit = args.device is not None
    args.device = args.device or "auto"
    device = resolve_device(args.device)
    if device.type != "cuda" and not explicit:
        print("no GPU here (torch.cuda.is_available() is False): nothing to measure. "
              "--device cpu measures the CPU path (with --quick: tiny sizes).")
        return 0
    per_client = args.per_client or (30 if args.quick else 600)
    args.rounds = args.rounds or (2 if args.quick else 4)
    if args.quick:
        args.epochs = min(args.epochs, 1)
    workers = [int(w) for w in (args.workers if args.workers is not None
                                else "1,2" if args.quick else "1,2,4,8").split(",") if w]
    workload = (f"{args.clients} clients x {per_client} MNIST images, CNN 32-64-512, "
                f"E={args.epochs}, B={args.batch}, {args.rounds} rounds")
    print(f"{device} ({device_name(device)}), torch {torch.__version__}: {workload}")
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "workload": workload, "parallel": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mnist"
        root.mkdir()
        # oiafed's test split takes 10 %: the clients get per_client images each
        write_subset(args.root, round(per_client * args.clients / 0.9), root)
        base = config(root, args)
        oiafed_times, plain_times = [], []
        usage = Utilisation(device)  # sampled during oiafed's runs, all repetitions
        for rep in range(args.reps):  # interleaved: drift of the machine hits both alike
            with usage:
                result = oiafed.run(base, run_dir=Path(tmp) / f"serial-{rep}")
            oiafed_times.append(round_times(result.history))
            plain_times.append(plain_rounds(base, device, args.rounds))
            print(f"serial round: oiafed {oiafed_times[-1]:.3f} s, plain PyTorch "
                  f"{plain_times[-1]:.3f} s, ratio {oiafed_times[-1] / plain_times[-1]:.3f}")
        ratios = [o / p for o, p in zip(oiafed_times, plain_times, strict=True)]
        print(f"serial round, median of {args.reps}: ratio {statistics.median(ratios):.3f}; "
              f"GPU utilisation {usage.text()}")
        results.update(oiafed_round_s=oiafed_times, plain_round_s=plain_times, ratios=ratios,
                       ratio=statistics.median(ratios), gpu_utilisation=usage.text())
        for count in workers:
            run = oiafed.run(config(root, args, mode="parallel", workers=count),
                             run_dir=Path(tmp) / f"parallel-{count}")
            print(f"parallel, {count} worker(s) sharing {device}: "
                  f"{round_times(run.history):.3f} s per round")
            results["parallel"][count] = round_times(run.history)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{device.type}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
