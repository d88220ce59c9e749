"""Poll efficiency on 20-s tasks: delay from completion to result, and polls per task.

Run from the repository root::

    .venv/bin/python benchmarks/bench_polling.py             # 3 runs, ~75 s
    .venv/bin/python benchmarks/bench_polling.py --runs 1 --jobs 5

Real time, not scaled: each run starts ``--jobs`` jobs per policy, spread over the
first 2 s, against fake servers (own threads) whose tasks take 20 s +- 2 s (uniform,
so a fixed interval is not flattered by durations that are a multiple of it), one
server reporting a linear ``progress`` and one not. All policies run at once, so they see
the same machine, and each draws its start times and durations from its own generator
with the same seed, so they see the same tasks (a paired comparison). The delay is
measured on one monotonic clock: the moment the server's task ends to the moment
``generate`` returns.

* default policy, service reports ``progress``: the finish is estimated from it;
* default policy, no ``progress``: backoff capped at 15% of the elapsed time;
* the provider CLI's habit (``vtrix run``): a fixed 5-s interval.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dreamo_async as d
from benchmarks._common import KEY, median, print_table, threaded_fake_server
from dreamo_async.testing import FakeDreamOServer, make_png

DURATION_MS = 20_000
PNG = make_png(32, 32)
CLI_POLICY = d.PollPolicy(
    initial_delay=5.0,
    max_delay=5.0,
    multiplier=1.0,
    jitter=0.0,
    use_progress=False,
    max_relative_delay=None,
)


async def jobs_through(
    server: FakeDreamOServer, policy: d.PollPolicy, jobs: int, rng: random.Random
) -> tuple[float, float, float]:
    """Mean delay (s) from task end to result in hand, as a share of the task's
    duration, and mean polls per task."""
    loop = asyncio.get_running_loop()
    async with d.DreamOClient(
        api_key=KEY, base_url=server.url, max_concurrency=jobs, poll=policy
    ) as client:

        async def one(start: float, duration_ms: int) -> tuple[str, float]:
            await asyncio.sleep(start)
            result = await client.generate(prompt=f"p [slow:{duration_ms}]", images=[PNG])
            return result.task_id, loop.time()

        done = await asyncio.gather(
            *(
                one(rng.uniform(0, 2), rng.randint(DURATION_MS - 2000, DURATION_MS + 2000))
                for _ in range(jobs)
            )
        )
    tasks = [(server.tasks[task_id], at) for task_id, at in done]
    delays = [at - task.ends_at for task, at in tasks]
    shares = [(at - task.ends_at) / (task.ends_at - task.created_at) for task, at in tasks]
    polls = collections.Counter(
        path.rsplit("/", 1)[1] for _, method, path in server.stats.request_times if method == "GET"
    )
    return (
        statistics.fmean(delays),
        statistics.fmean(shares),
        statistics.fmean(polls[task_id] for task_id, _ in done),
    )


async def one_run(jobs: int, seed: int) -> dict[str, tuple[float, float, float]]:
    async with (
        threaded_fake_server(task_duration_ms=DURATION_MS, report_progress=True) as progress,
        threaded_fake_server(task_duration_ms=DURATION_MS) as plain,
        threaded_fake_server(task_duration_ms=DURATION_MS) as cli,
    ):
        results = await asyncio.gather(
            jobs_through(progress, d.PollPolicy(), jobs, random.Random(seed)),
            jobs_through(plain, d.PollPolicy(), jobs, random.Random(seed)),
            jobs_through(cli, CLI_POLICY, jobs, random.Random(seed)),
        )
    names = ["default, with progress", "default, no progress", "fixed 5 s (provider CLI)"]
    return dict(zip(names, results, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10, help="jobs per policy and run")
    args = parser.parse_args()
    runs: list[dict[str, tuple[float, float, float]]] = []
    for seed in range(args.runs):
        runs.append(asyncio.run(one_run(args.jobs, seed)))
        print(runs[-1], flush=True)
    rows = []
    for name in runs[0]:
        delay = median([run[name][0] for run in runs])
        share = median([run[name][1] for run in runs])
        polls = median([run[name][2] for run in runs])
        rows.append([name, f"{delay:.2f} s", f"{100 * share:.1f}%", f"{polls:.1f}"])
    print_table(
        f"20-s (+-2 s) tasks, {args.jobs} jobs per policy, medians of {args.runs} runs",
        ["policy", "mean delay after completion", "as % of the task", "polls per task"],
        rows,
    )


if __name__ == "__main__":
    main()
