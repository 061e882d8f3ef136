"""Framework overhead counted in CPU instructions, not seconds: ``benchmarks/overhead.py``'s
workload (digits, 10 IID clients, MLP 64-64-10, FedAvg over all 10) under valgrind's callgrind.

Instruction counts are repeatable whatever else the machine runs, so this separates what
oiafed *executes* more than the plain loop from what its instructions *cost* (caches, memory
layout), which only timing shows. Each side runs in a fresh process under callgrind twice, for
``--short`` and ``--long`` rounds (after a warm-up run of the same length, so imports and
torch's first optimizer step are in both); the difference over ``long - short`` is the
per-round count. Sides: ``plain`` (the hand-written loop), ``stateless`` (``oiafed.run`` with
``checkpoint_every: 0``) and, with ``--defaults``, ``oiafed`` (its defaults: under callgrind a
round takes over a second, so the state file, throttled to once a second, is written every
round, which it is not at native speed).

Callgrind counts user-space instructions only: system calls' kernel work (the run folder's
writes) is not in the counts. The per-round figures and the machine go to
``benchmarks/results/overhead_instructions.json``; ``--keep DIR`` keeps callgrind's output files
there, for ``callgrind_annotate`` (which functions the instructions went to).

Needs valgrind (``apt-get install valgrind``); ~3 minutes a process on a 2-core VM. Run from
the repository root:

    .venv/bin/python benchmarks/overhead_instructions.py
    .venv/bin/python benchmarks/overhead_instructions.py --short 2 --long 22 --defaults --keep /tmp/cg
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "overhead_instructions.json"
TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


def child(side: str, rounds: int) -> None:
    """In the process under callgrind: one warm-up call and one counted call of ``side``."""
    sys.path.insert(0, str(HERE))
    import overhead

    overhead.ROUNDS = rounds
    overhead.CONFIG["trainer"]["args"]["rounds"] = rounds
    run = {"plain": overhead.run_plain, "stateless": overhead.run_oiafed_stateless,
           "oiafed": overhead.run_oiafed}[side]
    run(0)
    run(1)


def instructions(side: str, rounds: int, keep: Path | None) -> int:
    """Instructions callgrind counted in a fresh process running ``side`` for ``rounds``
    (its output file kept in ``keep`` when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = (keep or Path(tmp)) / f"callgrind.{side}_{rounds}.out"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, __file__, "--child", side, str(rounds)],
                       env=env, check=True, capture_output=True)
        found = TOTALS.search(out.read_bytes())
        if found is None:
            raise RuntimeError(f"no totals line in callgrind's output for {side}")
        return int(found.group(1))


def machine() -> dict[str, str]:
    """Where and when it ran."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "cores": str(os.cpu_count()), "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=2, help="rounds of the short run (2)")
    parser.add_argument("--long", type=int, default=22, help="rounds of the long run (22)")
    parser.add_argument("--defaults", action="store_true",
                        help="also count oiafed with its defaults (state file every round)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep callgrind's output files in DIR (for callgrind_annotate)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    sides = ["plain", "stateless", *(["oiafed"] if args.defaults else [])]
    per_round = {}
    for side in sides:
        counts = [instructions(side, rounds, args.keep) for rounds in (args.short, args.long)]
        per_round[side] = (counts[1] - counts[0]) / (2 * (args.long - args.short))
    print(f"instructions per round (10 clients; mean over {2 * (args.long - args.short)} rounds):")
    for side in sides:
        ratio = per_round[side] / per_round["plain"]
        print(f"  {side:<10} {per_round[side] / 1e6:8.2f} M   {ratio:.3f}x plain")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"per_round": per_round, "short": args.short,
                                   "long": args.long, "machine": machine()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
