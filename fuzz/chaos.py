"""The chaos suite at scale: N jobs (default 5000) against every fault at once; prints the table.

    python fuzz/chaos.py [jobs] [seed]

Exits non-zero when a job ended other than as a result or a typed DreamOError
(run_chaos re-raises it), when a job was lost, a task was created twice or left
unaccounted for, or asyncio tasks / file descriptors were left behind
(ChaosReport.problems).
"""

from __future__ import annotations

import asyncio
import sys

from dreamo_async.testing import ChaosConfig, run_chaos


def main() -> int:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    report = asyncio.run(run_chaos(jobs, config=ChaosConfig.everything(0.03, seed=seed)))
    print(report.table())
    problems = report.problems()
    for text in problems:
        print("FAILED:", text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
