"""What a pause between tasks costs a learner on this machine (the process floor of gRPC).

A loopback gRPC deployment gives each client its own process, which trains once a round and
waits the rest of it. This measures, in one process and with nothing else running, the CPU
time of the quickstart's 10 learners (``examples/quickstart.yaml``: an MLP on digits, 2 local
epochs, the configured learner and data of each client) trained round after round:

* back to back, as the serial runtime trains them (caches and predictors stay warm);
* with a ``time.sleep(--pause)`` after every client (default 25 ms, about one quickstart round
  of the other clients), as a client process lives in a deployment.

Printed: each client's CPU milliseconds per call (``time.process_time``, median over
``--calls``) in both settings, their sums, and the ratio. A ratio well above 1 is the part of
the gRPC runtime's per-round overhead that no transport can remove on this machine.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/idle_cost.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/idle_cost.py --pause 0.005 --calls 60
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch

from oiafed.core.learner import Learner
from oiafed.core.types import Weights
from oiafed.data.arrays import ArrayDataset

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


async def _cpu_per_call(learner: Learner, cid: str, weights: Weights, data: ArrayDataset,
                        calls: int, pause: float) -> float:
    """Median CPU seconds of ``learner.fit`` for ``cid``, with ``pause`` seconds between calls."""
    times = []
    for call in range(calls + 3):  # three warm-ups
        started = time.process_time()
        await learner.fit(cid, weights, data, round_num=call + 1, seed=call)
        if call >= 3:
            times.append(time.process_time() - started)
        if pause:
            time.sleep(pause)
    return statistics.median(times)


async def measure(pause: float, calls: int) -> None:
    import oiafed
    from oiafed.runtime.worker import ClientWorker

    worker = ClientWorker.from_config(oiafed.load_config(QUICKSTART))
    weights = {k: v.clone() for k, v in worker.learner.model.state_dict().items()}
    rows = []
    for cid in worker.data.client_ids:
        data = worker.data.client_data(cid)
        hot = await _cpu_per_call(worker.learner, cid, weights, data, calls, 0.0)
        cold = await _cpu_per_call(worker.learner, cid, weights, data, calls, pause)
        rows.append((cid, len(data), hot, cold))
    print(f"quickstart learners, CPU ms per fit, median of {calls} calls, {torch.get_num_threads()} "
          f"torch thread(s):")
    print(f"  {'client':10s} {'samples':>7s} {'back to back':>13s} {f'after {pause * 1e3:g} ms':>14s}")
    for cid, samples, hot, cold in rows:
        print(f"  {cid:10s} {samples:7d} {hot * 1e3:13.2f} {cold * 1e3:14.2f}")
    hot_sum, cold_sum = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"  {'all':10s} {'':7s} {hot_sum * 1e3:13.1f} {cold_sum * 1e3:14.1f}   "
          f"ratio {cold_sum / hot_sum:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pause", type=float, default=0.025, help="seconds between calls")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    asyncio.run(measure(args.pause, args.calls))


if __name__ == "__main__":
    main()
