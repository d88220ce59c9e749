"""One worker process of the multi-process Redis test and benchmark (run as a script).

It runs jobs against a FakeDreamOServer through a ``DreamOClient`` whose limits are
a shared :class:`~dreamo_async.RedisCoordinator`. Jobs come either from a Redis list
(``--queue``: the test, where a killed worker's jobs are put back and finished by
the others) or are a fixed count (``--jobs N``: the benchmark, no extra Redis
traffic). Prints ``READY``, then ``START <job>`` / ``DONE <job>`` lines, flushed,
and at the end ``STATS <round trips> <wall-clock time the last job ended>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

import dreamo_async as d
from dreamo_async.testing import make_png

IMAGE = make_png(64, 64)


def say(line: str) -> None:
    print(line, flush=True)


async def run(args: argparse.Namespace) -> None:
    backend: d.Coordinator
    if args.redis_url:
        backend = d.RedisCoordinator(args.redis_url, key=args.key, lease_ttl=args.lease_ttl)
    else:
        backend = d.LocalCoordinator()
    poll = d.PollPolicy(
        initial_delay=args.poll_s, max_delay=args.poll_s, jitter=0.1, use_progress=False
    )
    queue = aioredis.Redis.from_url(args.queue) if args.queue else None
    todo = list(range(args.jobs))
    async with d.DreamOClient(
        api_key="test-key",
        base_url=args.base_url,
        max_concurrency=args.max_concurrency,
        requests_per_second=args.rate or None,
        burst=args.burst,
        poll=poll,
        coordinator=backend,
        max_spend=args.max_spend,
    ) as client:
        say("READY")
        if args.wait_go:  # the benchmark starts every worker at once
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def next_job() -> str | None:
            if queue is None:
                return str(todo.pop()) if todo else None
            while True:
                # LMOVE: a job taken by a worker that then dies stays visible in its list.
                job = await queue.lmove(f"{args.key}:jobs", f"{args.key}:taken:{os.getpid()}")
                if job is not None:
                    return job.decode() if isinstance(job, bytes) else str(job)
                if await queue.scard(f"{args.key}:done") >= args.total:
                    return None
                await asyncio.sleep(0.05)

        async def loop() -> None:
            while (job := await next_job()) is not None:
                say(f"START {job}")
                images = [IMAGE] * (1 + int(job) % 5 if args.vary_images else 1)
                try:
                    await client.generate(prompt=f"job {job}", images=images)
                except d.BudgetExceededError:
                    say(f"CAPPED {job}")  # nothing sent: the job is over
                if queue is not None:
                    await queue.sadd(f"{args.key}:done", job)
                say(f"DONE {job}")

        await asyncio.gather(*(loop() for _ in range(args.loops or args.max_concurrency)))
        finished = time.time()
        trips = backend.round_trips if isinstance(backend, d.RedisCoordinator) else 0
    if queue is not None:
        await queue.aclose()
    say(f"STATS {trips} {finished:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--redis-url", default="", help="empty: LocalCoordinator")
    parser.add_argument("--queue", default="", help="Redis URL of the job queue (test mode)")
    parser.add_argument("--key", default="mp")
    parser.add_argument("--jobs", type=int, default=0, help="fixed job count (benchmark mode)")
    parser.add_argument("--total", type=int, default=0, help="jobs in the queue (test mode)")
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--loops", type=int, default=0, help="concurrent jobs asked for")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--poll-s", type=float, default=0.03)
    parser.add_argument("--max-spend", default=None, help="DreamOClient(max_spend=...)")
    parser.add_argument("--vary-images", action="store_true", help="1 + job % 5 images")
    parser.add_argument("--wait-go", action="store_true", help="start on a line on stdin")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
