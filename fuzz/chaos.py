"""The chaos suite at scale: N jobs (default 5000) against every fault at once; prints the tables.

    python fuzz/chaos.py [jobs] [seed]

Three runs: every fault at once; a client closed while slow creates are in flight; a
client with a strict rate whose dropped polls must not be re-sent behind its limiter.
Exits non-zero when a job ended other than as a result or a typed DreamOError
(run_chaos re-raises it), when a job was lost, a task was created twice or left
unaccounted for, the service saw more requests than the client's rate allowed, or
asyncio tasks / file descriptors were left behind (ChaosReport.problems).
"""

from __future__ import annotations

import asyncio
import sys

from dreamo_async.testing import ChaosConfig, ChaosReport, run_chaos


async def scenarios(jobs: int, seed: int) -> list[tuple[str, ChaosReport]]:
    everything = await run_chaos(jobs, config=ChaosConfig.everything(0.03, seed=seed))
    closed = await run_chaos(
        max(50, jobs // 10),
        config=ChaosConfig(seed=seed, slow_answer=0.5, slow_ms=1000, endpoints=("create",)),
        close_after=0.3,
        read_timeout=3.0,
        job_timeout=5.0,
        trace_memory=False,
    )
    paced = await run_chaos(
        max(50, jobs // 25),
        config=ChaosConfig(seed=seed, drop_before_body=0.3, endpoints=("poll",)),
        requests_per_second=100,
        job_timeout=10.0,
        trace_memory=False,
    )
    return [
        ("every fault at once", everything),
        ("client closed while slow creates are in flight", closed),
        ("strict rate, a third of the polls dropped", paced),
    ]


def main() -> int:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    failed = False
    for title, report in asyncio.run(scenarios(jobs, seed)):
        print(f"== {title}")
        print(report.table())
        for text in report.problems():
            print("FAILED:", text)
            failed = True
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
