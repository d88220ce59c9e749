"""A 429 storm: the default client against a service that limits at 20 requests/s.

Run from the repository root::

    .venv/bin/python benchmarks/bench_storm.py                  # 60 and 600 jobs, 3 runs
    .venv/bin/python benchmarks/bench_storm.py --jobs 60 --runs 1

The fake server (own thread) allows 20 requests in any 1-s window, refused attempts
counted too (a client that keeps hammering stays refused), and answers 429 with
``Retry-After: 0.2``. ``max_concurrency=30`` clients run N fast jobs at once with
``asyncio.gather``: the default client (``requests_per_second`` unset: full speed
until the first 429, then learned) and, as the baseline, one set to the right rate
(20). Printed, medians of the runs: jobs completed, the share of 429 answers after
the first 5 s, and the makespan divided by the well-configured client's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dreamo_async as d
from benchmarks._common import KEY, median, print_table, threaded_fake_server
from dreamo_async.testing import make_png

LIMIT = 20.0
WARM_UP = 5.0
PNG = make_png(32, 32)
VARIANTS: dict[str, Any] = {"default (unset)": None, "set to 20 req/s": LIMIT}


async def run(rate: float | None, jobs: int) -> tuple[int, float | None, float]:
    """One run: (jobs completed, 429 share after the warm-up or None, makespan in s)."""
    async with (
        threaded_fake_server(
            task_duration_ms=0,
            rate_limit=LIMIT,
            rate_counts_rejected=True,
            rate_retry_after_ms=200,
        ) as server,
        d.DreamOClient(
            api_key=KEY,
            base_url=server.url,
            max_concurrency=30,
            requests_per_second=rate,
            poll=d.PollPolicy(initial_delay=0.05, max_delay=0.5, timeout=300),
        ) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        warm = asyncio.Event()

        async def reset_after_warm_up() -> None:
            await asyncio.sleep(WARM_UP)
            server.reset_stats()
            warm.set()

        resetter = asyncio.ensure_future(reset_after_warm_up())
        results = await asyncio.gather(
            *(client.generate(prompt=f"p {i}", images=[PNG]) for i in range(jobs)),
            return_exceptions=True,
        )
        makespan = loop.time() - started
        resetter.cancel()
        done = sum(not isinstance(r, BaseException) for r in results)
        stats = server.stats
        share = stats.rate_limited / max(1, stats.requests) if warm.is_set() else None
    return done, share, makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, nargs="+", default=[60, 600])
    args = parser.parse_args()
    rows = []
    for jobs in args.jobs:
        results: dict[str, list[tuple[int, float | None, float]]] = {n: [] for n in VARIANTS}
        for _ in range(args.runs):
            for name, rate in VARIANTS.items():
                results[name].append(asyncio.run(run(rate, jobs)))
                print(jobs, name, results[name][-1], flush=True)
        baseline = median([r[2] for r in results["set to 20 req/s"]])
        for name, runs in results.items():
            shares = [r[1] for r in runs if r[1] is not None]
            rows.append(
                [
                    jobs,
                    name,
                    f"{median([r[0] for r in runs]):g}/{jobs}",
                    f"{100 * median(shares):.1f}%" if shares else "(ended < 5 s)",
                    f"{median([r[2] for r in runs]):.1f} s",
                    f"{median([r[2] for r in runs]) / baseline:.2f}x",
                ]
            )
    print_table(
        f"Service: {LIMIT:g} requests in any 1-s window (refused ones counted), "
        f"Retry-After 0.2 s; max_concurrency=30; medians of {args.runs} runs",
        ["jobs", "client", "completed", "429 share after 5 s", "makespan", "vs set to 20"],
        rows,
    )


if __name__ == "__main__":
    main()
