"""The per-round cost of secure aggregation (``runtime.secure_aggregation``) beside plain gRPC.

The evidence of issue 16, part 4. Each cell is one ``oiafed.run`` of a loopback gRPC deployment
(``runtime.mode: grpc`` without ``address``: a server on 127.0.0.1 and one ``oiafed client``
process per client, each with one torch thread), with and without secure aggregation, for
``--clients`` clients (default 10 and 50), all sampled every round. The task is small so that
the protocol's cost shows: digits (1,437 training images of 8x8), IID, ``fedavg_2nn`` (McMahan
et al.'s 2NN: 64-200-200-10, 55,410 float32 parameters, 222 KB), SGD lr 0.05, batch 32, one
local epoch, ``--rounds`` rounds (default 6), no evaluation until the last round.

Measured per round, over rounds 2.. (round 1 also pays the clients' first imports):

* ``round s``: the trainer's ``round_time`` (send, train, secure aggregation or the plain
  updates, aggregate), mean and max;
* ``load avg``: the machine's 1-minute load average as the cell started and ended (the
  machine is shared: timings are upper bounds and move with it);
* ``MB to server`` / ``MB from server``: the bytes of the serialized gRPC messages the server
  received and sent during the round (``FederationService.traffic``; gRPC's framing not
  counted), all clients together; ``KB/client``: their sum per client.

The secure rows use the default threshold (a majority), 24 fraction bits, bound 4. Results:
``OUT/results.json`` and ``OUT/README.md`` (table, command, date, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import oiafed
from oiafed import Callback

HERE = Path(__file__).resolve().parent


class Traffic(Callback):
    """Records the server's traffic counters at each round's start and end."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, int]] = {}
        self._start = (0, 0)

    @staticmethod
    def _now(trainer: Any) -> tuple[int, int]:
        traffic = trainer.runtime.service.traffic
        return traffic.sent, traffic.received

    async def on_round_start(self, trainer, round_num, **kwargs):
        self._start = self._now(trainer)

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        sent, received = self._now(trainer)
        self.rounds[round_num] = {"sent": sent - self._start[0],
                                  "received": received - self._start[1]}


def config(clients: int, rounds: int, secure: bool) -> dict[str, Any]:
    runtime: dict[str, Any] = {"mode": "grpc", "checkpoint_interval": 0, "checkpoint_every": 0}
    if secure:
        runtime["secure_aggregation"] = {}
    return {
        "name": f"secagg_{clients}_{'secure' if secure else 'plain'}", "seed": 0,
        "data": {"type": "digits", "num_clients": clients},
        "model": {"type": "fedavg_2nn"},
        "trainer": {"args": {"rounds": rounds, "eval_every": rounds}},
        "learner": {"args": {"lr": 0.05, "batch_size": 32, "epochs": 1}},
        "runtime": runtime,
    }


def cell(clients: int, rounds: int, secure: bool) -> dict[str, Any]:
    traffic = Traffic()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:  # the run folders are not kept
        result = oiafed.run(config(clients, rounds, secure), run_dir=Path(folder) / "run",
                            callbacks=[traffic])
    wall = time.perf_counter() - started
    later = [r for r in result.history if r["round"] >= 2]
    times = [r["round_time"] for r in later]
    to_server = [traffic.rounds[r["round"]]["received"] for r in later]
    from_server = [traffic.rounds[r["round"]]["sent"] for r in later]
    return {"clients": clients, "secure": secure, "rounds": rounds, "wall_s": wall,
            "round_s_mean": statistics.mean(times), "round_s_max": max(times),
            "bytes_to_server": statistics.mean(to_server),
            "bytes_from_server": statistics.mean(from_server),
            "final_accuracy": result.history[-1].get("accuracy"),
            "load_average": (load_before, os.getloadavg()[0]),
            "history": result.history}


def table(cells: list[dict[str, Any]]) -> str:
    lines = ["| clients | aggregation | round s (mean / max) | MB to server | MB from server "
             "| KB/client (both ways) | final accuracy | load avg (1 min, start/end) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        total = c["bytes_to_server"] + c["bytes_from_server"]
        lines.append(
            f"| {c['clients']} | {'secure' if c['secure'] else 'plain'} | "
            f"{c['round_s_mean']:.2f} / {c['round_s_max']:.2f} | "
            f"{c['bytes_to_server'] / 1e6:.2f} | {c['bytes_from_server'] / 1e6:.2f} | "
            f"{total / c['clients'] / 1e3:.0f} | {c['final_accuracy']:.4f} | "
            f"{c['load_average'][0]:.1f} / {c['load_average'][1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "secagg")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [cell(n, args.rounds, secure) for n in args.clients
             for secure in (False, True)]
    (args.out / "results.json").write_text(json.dumps(cells, indent=1), encoding="utf-8")
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=False).stdout
    readme = (f"# Secure aggregation: per-round cost beside plain gRPC\n\n{table(cells)}\n\n"
              f"Command: `python benchmarks/secagg.py --clients {' '.join(map(str, args.clients))}"
              f" --rounds {args.rounds}`  \nDate: {date.strip()}  \n"
              f"Machine: 2-core Xeon VM, CPU only ({platform.processor() or platform.machine()}), "
              "shared with other work; loopback gRPC, one process per client.\n\n"
              "Round times and bytes are means over rounds 2.. (see the script's docstring). "
              "The machine is shared: the load average beside each row says how busy it was "
              "(2 cores), so compare times within a row pair, not across runs.\n")
    (args.out / "README.md").write_text(readme, encoding="utf-8")
    print(readme)


if __name__ == "__main__":
    main()
