"""The request limiter under pressure: 500 waiters, 50 requests/s, 10 s.

Run from the repository root::

    .venv/bin/python benchmarks/bench_limiter.py             # 3 runs of each, ~2 minutes
    .venv/bin/python benchmarks/bench_limiter.py --runs 1 --seconds 5

Three rows, each 500 coroutines asking for a slot in a loop for ``--seconds``:

* ``TokenBucketLimiter`` alone: grant times on the loop clock;
* ``DreamOClient`` over HTTP: 500 coroutines polling one task with
  ``requests_per_second=50, burst=1``, counted where it matters, at the fake
  server (on its own thread);
* aiolimiter's ``AsyncLimiter(50, 1)`` (the ``bench`` extra), the well-kept library
  we chose not to build on: its bucket starts full, so its first second lets
  ``rate + capacity`` through.

Printed (medians): most requests in any 1-s window, most in the first second,
and the achieved rate over the run divided by the set rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dreamo_async as d
from benchmarks._common import KEY, median, print_table, threaded_fake_server
from dreamo_async.coordination import TokenBucketLimiter
from dreamo_async.testing import make_png, max_in_window

RATE = 50
WAITERS = 500


async def hammer(acquire: Callable[[], Awaitable[Any]], seconds: float) -> list[float]:
    """``WAITERS`` coroutines take slots for ``seconds``; the grant times (loop clock)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    times: list[float] = []

    async def waiter() -> None:
        while loop.time() - started < seconds:
            await acquire()
            times.append(loop.time())

    await asyncio.gather(*(waiter() for _ in range(WAITERS)))
    return times


def figures(times: list[float], seconds: float) -> tuple[int, int, float]:
    first = min(times)
    inside = [t for t in times if t - first < seconds]
    in_first_second = sum(1 for t in times if t - first < 1.0)
    return max_in_window(inside), in_first_second, len(inside) / (seconds * RATE)


async def ours(seconds: float) -> tuple[int, int, float]:
    limiter = TokenBucketLimiter(RATE, burst=1)
    return figures(await hammer(limiter.acquire, seconds), seconds)


async def aiolimiter_baseline(seconds: float) -> tuple[int, int, float]:
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(RATE, 1.0)
    return figures(await hammer(limiter.acquire, seconds), seconds)


async def client_over_http(seconds: float) -> tuple[int, int, float]:
    async with (
        threaded_fake_server(task_duration_ms=10**9) as server,
        d.DreamOClient(
            api_key=KEY, base_url=server.url, requests_per_second=RATE, burst=1
        ) as client,
    ):
        task = await client.submit(prompt="p", images=[make_png(32, 32)])
        await asyncio.sleep(1.5)  # a fresh second: the create is out of every window below
        server.reset_stats()
        await hammer(lambda: client.get_task(task.id), seconds)
        times = [t for t, _, path in server.stats.request_times if path.startswith("/model/")]
    return figures(times, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    variants: dict[str, Callable[[float], Awaitable[tuple[int, int, float]]]] = {
        "TokenBucketLimiter": ours,
        "DreamOClient, at the fake server": client_over_http,
    }
    try:
        import aiolimiter  # noqa: F401
    except ImportError:
        print("aiolimiter is not installed (pip install -e '.[bench]'): skipping its row")
    else:
        variants["aiolimiter AsyncLimiter(50, 1)"] = aiolimiter_baseline
    results: dict[str, list[tuple[int, int, float]]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, variant in variants.items():
            results[name].append(asyncio.run(variant(args.seconds)))  # type: ignore[arg-type]
            print(name, results[name][-1], flush=True)
    rows = [
        [
            name,
            median([r[0] for r in runs]),
            median([r[1] for r in runs]),
            f"{median([r[2] for r in runs]):.3f}x",
        ]
        for name, runs in results.items()
    ]
    print_table(
        f"{WAITERS} waiters, {RATE} req/s, burst 1, {args.seconds:g} s "
        f"(bound: {RATE + 1} in any 1-s window), medians of {args.runs} runs",
        ["limiter", "max in any 1-s window", "in the first second", "achieved / set"],
        rows,
    )


if __name__ == "__main__":
    main()
