"""CPU instructions per tiny job, library and bare aiohttp loop, counted by callgrind.

Run from the repository root (needs ``valgrind``; skipped without it)::

    .venv/bin/python benchmarks/bench_instructions.py

The throughput benchmark's ratio moves by ±15% from run to run on a shared machine.
Both sides of it are CPU-bound (the fake server needs about one core, the client the
other), so what decides the ratio is the client's CPU work per job, and that can be
counted exactly: valgrind's callgrind counts the instructions the client process
executes (C and Python alike), the same whatever else the machine is doing (±0.5%
here: the order in which answers arrive varies a little).

Each variant of ``bench_throughput.py`` runs in its own process under callgrind, once
with ``--small`` jobs and once with ``--large``; the difference divided by the extra
jobs is the cost of one job, without the start-up (imports, the session). The fake
server runs in another process, not counted. Printed: instructions per job, and
``bare / library``: the throughput ratio to expect when the client is the bottleneck
(the measured one lies between it and 1, as the server shares the load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, fake_server_process, print_table
from benchmarks.bench_throughput import MODES, run_bare_aiohttp, run_library

VARIANTS = {"dreamo_async": run_library, "bare aiohttp": run_bare_aiohttp}


def instructions(variant: str, url: str, jobs: int, mode: str, concurrency: int) -> int:
    """Instructions the client process executes for ``jobs`` jobs (start-up included)."""
    with tempfile.TemporaryDirectory() as scratch:
        completed = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={scratch}/callgrind.out",
                sys.executable,
                __file__,
                "--child",
                variant,
                url,
                str(jobs),
                mode,
                str(concurrency),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
    found = re.search(r"Collected : (\d+)", completed.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{completed.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200, help="jobs of the shorter run")
    parser.add_argument("--large", type=int, default=600, help="jobs of the longer run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, url, jobs, mode, concurrency = args.child
        asyncio.run(VARIANTS[variant](url, int(jobs), int(concurrency), mode))
        return
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind): skipped")
        return

    rows = []
    extra = args.large - args.small
    with fake_server_process("--task-duration-ms", "0") as url:
        for mode in args.mode:
            per_job = {}
            for variant in VARIANTS:
                counts = [
                    instructions(variant, url, jobs, mode, args.concurrency)
                    for jobs in (args.small, args.large)
                ]
                per_job[variant] = (counts[1] - counts[0]) / extra
            ours, bare = per_job["dreamo_async"], per_job["bare aiohttp"]
            rows.append([mode, ours, bare, f"{ours / bare:.3f}x", f"{bare / ours:.2f}x"])
    print_table(
        f"Client instructions per tiny job (callgrind; ({args.large} - {args.small} jobs) / "
        f"{extra}, concurrency {args.concurrency})",
        ["driven by", "dreamo_async", "bare aiohttp", "library / bare", "bare / library"],
        rows,
    )


if __name__ == "__main__":
    main()
