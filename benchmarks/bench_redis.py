"""Benchmark of the shared limits (issue 6): what Redis costs against in-process limits.

Run from the repository root (needs ``redis-server`` on the PATH)::

    .venv/bin/python benchmarks/bench_redis.py            # 5 runs of everything (~1.5 min)
    .venv/bin/python benchmarks/bench_redis.py --quick    # 3 runs

Figures (medians of several runs; each Redis figure has its in-process baseline
measured in the same run, and a ratio):

(a) rate limiter: µs per ``acquire()`` that never has to wait (rate and burst far
    above the load): ``RedisCoordinator`` (one Lua GCRA call) against ``LocalCoordinator``.
(b) job slots: µs per ``acquire()`` + ``release()`` pair with free slots.
(c) jobs/s against FakeDreamOServer (its own process, 5 ms tasks, polls every 5 ms)
    for 1 and 4 worker processes, each a ``DreamOClient``. Local: each process gets
    ``16 / processes`` slots (the static split one would do without sharing);
    Redis: 16 slots shared. Both at a rate (2000/s) that never binds, so the
    figure is the overhead, not the limit.
(d) Redis round trips per job in (c), counted by the server (``INFO commandstats``:
    EVALSHA, BLPOP, SCRIPT LOAD and connection set-up, the commands a client sends)
    and by the clients (``RedisCoordinator.round_trips``).

One redis-server (no persistence) on a free loopback port; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402

import dreamo_async as d  # noqa: E402
from benchmarks._common import fake_server_process, interpreter  # noqa: E402
from tests.redis_server import RedisServer, redis_server_binary  # noqa: E402

WORKER = ROOT / "tests" / "redis_worker.py"
JOBS = 400
SLOTS = 16
RATE = 2000.0


async def per_call_us(calls: int, op: Callable[[], Awaitable[None]]) -> float:
    for _ in range(min(100, calls)):  # warm-up: connections, script cache
        await op()
    started = time.perf_counter()
    for _ in range(calls):
        await op()
    return (time.perf_counter() - started) / calls * 1e6


async def limiter_us(backend: d.Coordinator, calls: int) -> float:
    limiter = backend.make_limiter(1e6, 1_000_000)
    return await per_call_us(calls, limiter.acquire)


async def slots_us(backend: d.Coordinator, calls: int) -> float:
    slots = backend.make_slots(1000)

    async def pair() -> None:
        await slots.release(await slots.acquire())

    return await per_call_us(calls, pair)


#: Commands only a client sends (never called inside our scripts): one per round trip.
CLIENT_COMMANDS = ("evalsha", "eval", "blpop", "script|load", "hello", "client|setinfo", "ping")


async def client_commands(probe: aioredis.Redis) -> int:
    """Round trips Redis has served so far, by its own ``INFO commandstats``.

    (``total_commands_processed`` would also count every ``redis.call`` inside a script.)
    """
    stats = await probe.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in CLIENT_COMMANDS)


async def jobs_per_s(
    base_url: str, redis_url: str | None, processes: int, key: str
) -> tuple[float, int, int]:
    """(jobs/s, server-counted Redis commands, client-counted round trips) for one run."""
    probe = aioredis.Redis.from_url(redis_url) if redis_url else None
    counted_before = await client_commands(probe) if probe else 0
    slots = SLOTS if redis_url else SLOTS // processes
    args = [
        *("--base-url", base_url, "--key", key, "--wait-go"),
        *("--jobs", str(JOBS // processes), "--max-concurrency", str(slots)),
        *("--loops", str(2 * SLOTS // processes), "--rate", str(RATE), "--burst", "50"),
        *("--poll-s", "0.005", "--lease-ttl", "5"),
        *(("--redis-url", redis_url) if redis_url else ()),
    ]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    for worker in workers:
        assert worker.stdout is not None
        assert (await worker.stdout.readline()).strip() == b"READY"
    started = time.time()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"GO\n")
        await worker.stdin.drain()
    ends: list[float] = []
    trips = 0
    for worker in workers:
        assert worker.stdout is not None
        async for line in worker.stdout:
            if line.startswith(b"STATS "):
                _, count, ended = line.split()
                trips += int(count)
                ends.append(float(ended))
        assert await worker.wait() == 0
    counted = 0
    if probe:
        counted = await client_commands(probe) - counted_before
        await probe.aclose()
    return JOBS / (max(ends) - started), counted, trips


def row(name: str, local: float, redis: float, unit: str) -> str:
    return f"{name:<46}{local:>10.1f}{redis:>10.1f}{redis / local:>8.2f}x  {unit}"


async def main(runs: int) -> None:
    binary = redis_server_binary()
    if binary is None:
        raise SystemExit("redis-server not found: sudo apt-get install redis-server")
    server = RedisServer(binary)
    server.start()
    try:
        with fake_server_process("--task-duration-ms", "5") as base_url:
            results: dict[str, list[float]] = {}

            def add(name: str, value: float) -> None:
                results.setdefault(name, []).append(value)

            for run in range(runs):
                redis_backend = d.RedisCoordinator(server.url, key=f"micro{run}")
                add("rate_local", await limiter_us(d.LocalCoordinator(), 5000))
                add("rate_redis", await limiter_us(redis_backend, 2000))
                add("slot_local", await slots_us(d.LocalCoordinator(), 5000))
                add("slot_redis", await slots_us(redis_backend, 1000))
                await redis_backend.aclose()
                for processes in (1, 4):
                    for mode in ("local", "redis"):
                        url = server.url if mode == "redis" else None
                        rate, counted, trips = await jobs_per_s(
                            base_url, url, processes, key=f"jobs{run}-{processes}"
                        )
                        add(f"jobs_{mode}_{processes}", rate)
                        if url:
                            add(f"counted_{processes}", counted / JOBS)
                            add(f"trips_{processes}", trips / JOBS)
                print(f"run {run + 1}/{runs} done", file=sys.stderr)
    finally:
        server.close()

    med = {name: statistics.median(values) for name, values in results.items()}
    print(f"\nmedians of {runs} runs; redis-server {server.url} on loopback [{interpreter()}]\n")
    print(f"{'':<46}{'local':>10}{'redis':>10}{'ratio':>9}")
    print(row("(a) rate limiter acquire", med["rate_local"], med["rate_redis"], "µs/call"))
    print(row("(b) job slot acquire + release", med["slot_local"], med["slot_redis"], "µs/pair"))
    for processes in (1, 4):
        name = f"(c) jobs/s, {processes} process{'es' if processes > 1 else ''}"
        local, redis = med[f"jobs_local_{processes}"], med[f"jobs_redis_{processes}"]
        print(row(name, local, redis, "jobs/s"))
    for processes in (1, 4):
        print(
            f"(d) Redis round trips per job, {processes} proc: "
            f"{med[f'counted_{processes}']:.2f} (server count), "
            f"{med[f'trips_{processes}']:.2f} (client count)"
        )
    print(
        f"\n(c) {JOBS} jobs of 5 ms, polls every 5 ms, {SLOTS} slots in all "
        f"(local: split per process), rate {RATE:g}/s never binding."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 5")
    parsed = parser.parse_args()
    asyncio.run(main(3 if parsed.quick else 5))
