"""``requests_per_second="auto"`` against a service that limits at 20 requests/s.

Run from the repository root::

    .venv/bin/python benchmarks/bench_auto_rate.py            # 3 runs of 30 s
    .venv/bin/python benchmarks/bench_auto_rate.py --runs 1 --seconds 15

The fake server (own thread) answers 429 with ``Retry-After`` above 20 requests/s
(a token bucket of 20). 32 workers run tiny jobs back to back through one client
with ``requests_per_second="auto"`` (and, as the baseline, with no rate limit at
all, which only has the shared cool-down after each 429). After the first 5 s the
server's counters are reset; printed (medians): the share of 429 answers and the
rate of accepted requests divided by 20.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


async def run(rate: Any, seconds: float) -> tuple[float, float, float]:
    async with (
        threaded_fake_server(task_duration_ms=200, rate_limit=LIMIT) as server,
        d.DreamOClient(
            api_key=KEY,
            base_url=server.url,
            max_concurrency=32,
            requests_per_second=rate,
            poll=d.PollPolicy(initial_delay=0.1, max_delay=0.5, timeout=60),
        ) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def worker() -> None:
            while loop.time() - started < seconds:
                with contextlib.suppress(d.RateLimitError):
                    await client.generate(prompt="p", images=[PNG])

        async def reset_after_warm_up() -> float:
            await asyncio.sleep(WARM_UP)
            server.reset_stats()
            return loop.time()

        measuring = asyncio.ensure_future(reset_after_warm_up())
        await asyncio.gather(*(worker() for _ in range(32)))
        window = loop.time() - await measuring
        stats = server.stats
        limited = stats.rate_limited
        share = limited / max(1, stats.requests)
        achieved = (stats.requests - limited) / window / LIMIT
        learned = float(getattr(client._transport.limiter, "rate", float("nan")))
    return share, achieved, learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    variants: dict[str, Any] = {'"auto"': "auto", "no limit (cool-down only)": None}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, rate in variants.items():
            results[name].append(asyncio.run(run(rate, args.seconds)))
            print(name, results[name][-1], flush=True)
    rows = [
        [
            name,
            f"{100 * median([r[0] for r in runs]):.1f}%",
            f"{median([r[1] for r in runs]):.2f}x",
            median([r[2] for r in runs]),
        ]
        for name, runs in results.items()
    ]
    print_table(
        f"Service limit {LIMIT:g} req/s; figures after the first {WARM_UP:g} s of "
        f"{args.seconds:g} s, medians of {args.runs} runs",
        ["requests_per_second", "429 share", "accepted / 20", "rate at the end"],
        rows,
    )


if __name__ == "__main__":
    main()
