"""Benchmark of ``max_spend`` (issue 17): what the budget check costs per job.

Run from the repository root (the Redis rows need ``redis-server`` on the PATH)::

    .venv/bin/python benchmarks/bench_budget.py           # 3 runs, 400 jobs each

Each row runs ``JOBS`` jobs (create + polls, 5 ms tasks) with 16 at a time through one
``DreamOClient`` against FakeDreamOServer in its own process, and reports wall-clock
µs per job and CPU µs per job of this process (medians of the runs), with the ratio
to the no-cap row of the same backend measured in the same run. The cap is far above
the spend (nothing is refused) and ``expected_cost`` is given, so the figure is the
check itself: in-process, a few Decimal operations; with Redis, one reserve script
before the create and one settle script after the end (two round trips per job).

A second table times the ledger alone: one ``reserve`` + ``settle`` pair, no HTTP
(the Redis settle awaited), µs per pair, medians of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dreamo_async as d  # noqa: E402
from benchmarks._common import KEY, fake_server_process, print_table  # noqa: E402
from dreamo_async.testing import make_png  # noqa: E402
from tests.redis_server import RedisServer, redis_server_binary  # noqa: E402

JOBS = 400
SLOTS = 16
PNG = make_png(64, 64)
POLL = d.PollPolicy(initial_delay=0.005, max_delay=0.005, jitter=0.0, use_progress=False)


async def run(url: str, backend: d.Coordinator, cap: str | None) -> tuple[float, float]:
    """(wall µs per job, CPU µs per job) for JOBS jobs."""
    async with d.DreamOClient(
        api_key=KEY,
        base_url=url,
        max_concurrency=SLOTS,
        poll=POLL,
        coordinator=backend,
        max_spend=cap,
        expected_cost="0.03",
    ) as client:
        await asyncio.gather(*(client.generate(prompt="warm", images=[PNG]) for _ in range(SLOTS)))
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(JOBS)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if cap is not None:
            assert client.spending().completed >= JOBS
    return wall / JOBS * 1e6, cpu / JOBS * 1e6


async def ledger_us(make: Any, cap: str | None, pairs: int = 2000) -> float:
    """µs per reserve + settle of a client's ledger (the Redis settle awaited)."""
    backend = make()
    client = d.DreamOClient(api_key=KEY, coordinator=backend, max_spend=cap)
    ledger = client._budget.ledger
    cost = Decimal("0.03")
    started = time.perf_counter()
    for _ in range(pairs):
        held = await ledger.reserve(cost, 1)
        ledger.settle(held, cost, failed=False)
        if isinstance(backend, d.RedisCoordinator) and backend._tasks:
            await asyncio.wait(list(backend._tasks))
    elapsed = time.perf_counter() - started
    await client.aclose()
    return elapsed / pairs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    binary = redis_server_binary()
    redis = RedisServer(binary) if binary else None
    if redis is not None:
        redis.start()
    variants: list[tuple[str, Any, str | None]] = [
        ("in-process, no cap", d.LocalCoordinator, None),
        ("in-process, max_spend", d.LocalCoordinator, "1000000"),
    ]
    if redis is not None:
        url = redis.url
        for n, label in enumerate(("RedisCoordinator, no cap", "RedisCoordinator, max_spend")):
            key = f"bench-{n}"
            variants.append((label, lambda key=key: d.RedisCoordinator(url, key=key), "1000000"))
        variants[2] = (variants[2][0], variants[2][1], None)
    results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in variants}
    pair_us: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    try:
        with fake_server_process("--task-duration-ms", "5") as server_url:
            for _ in range(args.runs):
                for label, make, cap in variants:
                    results[label].append(asyncio.run(run(server_url, make(), cap)))
                    pair_us[label].append(asyncio.run(ledger_us(make, cap)))
    finally:
        if redis is not None:
            redis.close()
    rows = []
    for i, (label, _, _) in enumerate(variants):
        base = variants[i - 1][0] if i % 2 else label
        wall = statistics.median(w for w, _ in results[label])
        cpu = statistics.median(c for _, c in results[label])
        base_wall = statistics.median(w for w, _ in results[base])
        base_cpu = statistics.median(c for _, c in results[base])
        rows.append([label, wall, wall / base_wall, cpu, cpu / base_cpu])
    print_table(
        f"max_spend overhead, {JOBS} jobs x {args.runs} runs, {SLOTS} at a time (medians)",
        ["variant", "wall µs/job", "ratio", "CPU µs/job", "ratio"],
        rows,
    )
    print_table(
        "the ledger alone: one reserve + settle (no cap: counting only), medians",
        ["variant", "µs per job"],
        [[label, statistics.median(pair_us[label])] for label, _, _ in variants],
    )


if __name__ == "__main__":
    main()
