"""What the gRPC runtime costs: model round trips on loopback, and per-round overhead.

1. Round trip. A ``GrpcRuntime`` server in this process and one client process (this script
   with ``--echo-client``) on 127.0.0.1, token on, no TLS. Each repetition is one
   ``runtime.train`` call: the server encodes the global weights (safetensors), streams them in
   1 MiB chunks, the client reassembles and decodes them, "trains" (returns them unchanged),
   encodes and streams its update back, and the server reassembles and decodes it. Printed:
   the median and best round-trip time of ``--params`` float32 parameters (default 10M =
   40 MB), and the effective throughput, bytes moved both ways / round-trip time (the update's
   size / round-trip time is printed too: half of it).

2. Per-round overhead. ``examples/quickstart.yaml`` (10 clients, an MLP on digits, 2 local
   epochs) run with ``runtime.mode: serial`` and ``grpc`` (a loopback deployment, one client
   process per client), ``--rounds`` rounds each, alternating, ``--reps`` times. Each run's
   per-round time is the median ``round_time`` of its rounds after the first (process start
   and warm-up excluded); printed: the median over repetitions for each mode and the overhead
   ``grpc / serial - 1``. Every process uses ``--threads`` torch threads (default 1) so both
   modes do the same work per client; note that the gRPC clients train concurrently, so on a
   machine with a core per client it can be faster than serial, and on one with fewer cores
   slower than the transport alone explains. Two references separate the two costs:
   - the process floor: ``runtime.mode: parallel`` with ``workers: 10``, the same number of
     processes as the gRPC deployment (one client each per round) talking over pipes, no gRPC:
     what 10 training processes cost on this machine's cores;
   - the transport alone: a round trip of the quickstart model to 10 echo client processes
     (no training), as a share of a serial round.

Run from the repository root:

    .venv/bin/python benchmarks/transport.py                   # both parts
    .venv/bin/python benchmarks/transport.py --part roundtrip --params 10000000 --reps 10
    .venv/bin/python benchmarks/transport.py --part overhead --rounds 10 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def echo_client(port: int, client_id: str) -> None:
    """An echo client process: returns every task's weights unchanged."""
    from oiafed import ClientUpdate
    from oiafed.runtime.envelope import decode_round, pack_update
    from oiafed.runtime.grpc import ClientSecurity
    from oiafed.runtime.grpc.client import FederationClient
    from oiafed.runtime.worker import TaskReply

    def execute(round_data: memoryview, client_data: bytes) -> TaskReply:
        weights = decode_round(round_data).weights
        return TaskReply(pack_update(ClientUpdate(client_id, 1, {"accuracy": 0.0, "loss": 0.0},
                                                    weights)))

    FederationClient(f"127.0.0.1:{port}", client_id, execute,
                     ClientSecurity(os.environ["OIAFED_TOKEN"])).run()


async def _round_trips(weights: dict[str, torch.Tensor], clients: int, reps: int) -> list[float]:
    """Seconds per ``runtime.train`` of ``weights`` to ``clients`` echo client processes."""
    from oiafed.core.types import ClientTask, ClientUpdate, RoundTask
    from oiafed.runtime.base import RunEnd, RunSpec
    from oiafed.runtime.grpc import GrpcRuntime, ServerSecurity
    from oiafed.runtime.grpc.auth import client_token

    secret = secrets.token_urlsafe(32)
    client_ids = [f"client_{i}" for i in range(clients)]
    runtime = GrpcRuntime("127.0.0.1:0", ServerSecurity(secret), min_join=0)
    await runtime.start(RunSpec(client_ids=client_ids, num_sampled=clients))
    processes = [subprocess.Popen([sys.executable, __file__, "--echo-client", str(runtime.port), cid],
                                  env={**os.environ, "OIAFED_TOKEN": client_token(secret, cid)})
                 for cid in client_ids]
    try:
        deadline = time.monotonic() + 300
        while len(runtime.sessions) < clients:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("the echo clients did not join")
            await asyncio.sleep(0.05)
        times = []
        for rep in range(reps + 2):  # two warm-ups
            started = time.perf_counter()
            outcomes = await runtime.train(RoundTask(rep + 1, weights, {"lr": 0.05}),
                                           [ClientTask(cid, rep) for cid in client_ids], None)
            elapsed = time.perf_counter() - started
            for update in outcomes:
                if not isinstance(update, ClientUpdate) or not all(
                        torch.equal(update.weights[k], v) for k, v in weights.items()):
                    raise RuntimeError(f"an update came back different: {update}")
            if rep >= 2:
                times.append(elapsed)
        return times
    finally:
        await runtime.close(RunEnd(ok=True, reason="benchmark done"))
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def round_trip(params: int, reps: int) -> None:
    size = params * 4
    times = asyncio.run(_round_trips({"w": torch.randn(params)}, 1, reps))
    median, best = statistics.median(times), min(times)
    print(f"round trip of {params:,} float32 parameters ({size / 1e6:.1f} MB each way), "
          f"{reps} repetitions:")
    print(f"  time        median {median * 1e3:8.1f} ms   best {best * 1e3:8.1f} ms")
    print(f"  throughput  median {2 * size / median / 1e6:8.0f} MB/s best {2 * size / best / 1e6:8.0f} MB/s"
          "   (bytes both ways / round trip; goal >= 500)")
    print(f"  update size / round trip: median {size / median / 1e6:.0f} MB/s")


MODES = {
    "serial": {"runtime.mode": "serial"},
    "grpc": {"runtime.mode": "grpc"},
    "floor": {"runtime.mode": "parallel", "runtime.workers": 10},
}
"""The runs of the overhead part; ``floor``: as many processes as ``grpc``, no gRPC."""


def _per_round(mode: str, rounds: int, threads: int) -> tuple[float, float]:
    import oiafed

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = oiafed.run(QUICKSTART, run_dir=Path(folder) / "run", overrides={
            **MODES[mode], "runtime.threads": threads, "trainer.args.rounds": rounds})
        total = time.perf_counter() - started
    return statistics.median(row["round_time"] for row in result.history[1:]), total


def _quickstart_weights() -> dict[str, torch.Tensor]:
    import oiafed
    from oiafed.data.federated import build_federated_data
    from oiafed.runtime.worker import build_model

    cfg = oiafed.load_config(QUICKSTART)
    return build_model(cfg, build_federated_data(cfg.data, cfg.seed)).state_dict()


def overhead(rounds: int, reps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    transport = asyncio.run(_round_trips(_quickstart_weights(), 10, 30))
    per_round: dict[str, list[float]] = {mode: [] for mode in MODES}
    totals: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(reps):
        for mode in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
            seconds, total = _per_round(mode, rounds, threads)
            per_round[mode].append(seconds)
            totals[mode].append(total)
    median = {mode: statistics.median(times) for mode, times in per_round.items()}
    serial = median["serial"]
    print(f"quickstart ({QUICKSTART.name}: 10 clients, MLP, 2 epochs), {rounds} rounds, "
          f"{reps} repetitions, {threads} torch thread(s) per process, {os.cpu_count()} CPUs:")
    labels = {"serial": "serial", "grpc": "grpc", "floor": "parallel, 10 workers"}
    for mode in MODES:
        runs = " ".join(f"{t * 1e3:.1f}" for t in per_round[mode])
        print(f"  {labels[mode]:20s} per round (median after round 1) {median[mode] * 1e3:6.1f} ms"
              f"  whole run {statistics.median(totals[mode]):5.1f} s   runs: {runs}")
    print(f"  per-round overhead of grpc over serial: {(median['grpc'] / serial - 1) * 100:+.1f} % "
          "(goal <= 25 %)")
    print(f"  process floor (10 processes, no gRPC) over serial: "
          f"{(median['floor'] / serial - 1) * 100:+.1f} %; grpc over that floor: "
          f"{(median['grpc'] / median['floor'] - 1) * 100:+.1f} %")
    cost = statistics.median(transport)
    print(f"  transport alone: a round trip of the quickstart model to 10 echo client processes "
          f"takes {cost * 1e3:.1f} ms (median of 30), {cost / serial * 100:.1f} % of a serial round")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["roundtrip", "overhead", "all"], default="all")
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions (default: 10 round trips, 3 runs per mode)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--echo-client", nargs=2, metavar=("PORT", "ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_client is not None:
        echo_client(int(args.echo_client[0]), args.echo_client[1])
        return
    if args.part in ("roundtrip", "all"):
        round_trip(args.params, args.reps or 10)
    if args.part in ("overhead", "all"):
        overhead(args.rounds, args.reps or 3, args.threads)


if __name__ == "__main__":
    main()
