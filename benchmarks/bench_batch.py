"""Benchmark of resumable bulk runs (issue 5): a script that prints a table, not a test.

Run from the repository root::

    .venv/bin/python benchmarks/bench_batch.py           # 5 runs of each figure
    .venv/bin/python benchmarks/bench_batch.py --quick   # 3 runs, fewer jobs

Figures (medians of several runs; every ratio uses a baseline measured in the same run):

(a) journal cost per job in isolation: the four writes of a job's life (insert as
    queued, sending, created, completed with its result) by 16 concurrent jobs, µs per
    job, for each ``Journal(fsync=...)`` mode (``critical``, the default, fsyncs the
    group commits that hold a ``sending`` or ``created`` write), against the baseline:
    the same SQL on an in-memory database in the caller's thread (no thread, no disk).
(b) the whole engine against FakeDreamOServer on loopback, in its own process (so the
    figures are the client's own cost, not the fake's): ``run_batch`` with the
    durable journal against ``run_batch`` with the in-memory baseline journal; the
    difference per job is the journal's overhead inside a real run.
(c) jobs/s of ``run_batch`` (the ``dreamo batch`` engine: journal, downloads to disk,
    fsync + atomic rename per image) against ``DreamOClient.generate_many`` (no
    journal, no downloads) with the same client settings; the ratio is batch/baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dreamo_async as d  # noqa: E402
from benchmarks._common import KEY, fake_server_process, interpreter  # noqa: E402
from dreamo_async.batch import BatchJob, Journal, run_batch  # noqa: E402
from dreamo_async.batch.journal import _SCHEMA  # noqa: E402
from dreamo_async.testing import make_png  # noqa: E402

_T = TypeVar("_T")
CONCURRENCY = 16


class MemoryJournal(Journal):
    """The baseline: the same SQL against an in-memory database, in the caller's thread."""

    def open(self) -> Self:
        self._conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._conn.executescript(_SCHEMA)
        self._thread = None
        return self

    def close(self) -> None:
        self._conn.close()

    def submit(
        self, fn: Callable[[sqlite3.Connection], _T], *, sync: bool = True
    ) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        future.set_result(fn(self._conn))
        return future

    async def acall(self, fn: Callable[[sqlite3.Connection], _T], *, sync: bool = True) -> _T:
        return fn(self._conn)


def journal_factory(kind: str, path: Path) -> Journal:
    if kind == "memory":
        return MemoryJournal(path)
    return Journal(path, fsync=kind)  # type: ignore[arg-type]


async def journal_only(kind: str, jobs: int, folder: Path) -> float:
    """µs per job for the four writes of each job, 16 jobs at a time."""
    batch = [
        BatchJob(index=i, params={"prompt": f"p{i}", "images": ["x.png"]}) for i in range(jobs)
    ]
    journal = journal_factory(kind, folder / f"{kind}-{time.monotonic_ns()}.db").open()
    slots = asyncio.Semaphore(CONCURRENCY)
    try:
        started = time.perf_counter()
        await asyncio.to_thread(journal.sync_jobs, batch)

        async def life(index: int) -> None:
            async with slots:
                await journal.aupdate(index, "sending", request_id=f"r{index}")
                await journal.aupdate(index, "created", task_id=f"t{index}")
                await journal.aupdate(
                    index,
                    "completed",
                    result='{"image_urls": ["http://x/0.png"]}',
                    files='["/out/00000-t-0.png"]',
                    cost="0.03",
                )

        await asyncio.gather(*(life(i) for i in range(jobs)))
        return (time.perf_counter() - started) / jobs * 1e6
    finally:
        journal.close()


def requests_for(count: int, image: Path, tag: str) -> list[d.GenerationParams]:
    return [{"prompt": f"{tag} {i}", "images": [image], "seed": i} for i in range(count)]


def client_for(server: str) -> d.DreamOClient:
    return d.DreamOClient(
        api_key=KEY,
        base_url=server,
        max_concurrency=CONCURRENCY,
        poll=d.PollPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.1, timeout=60),
    )


async def engine_run(server: str, kind: str, jobs: int, image: Path, folder: Path) -> float:
    """Seconds for ``run_batch`` of ``jobs`` jobs with the given journal kind."""
    run_folder = Path(tempfile.mkdtemp(dir=folder))
    journal = journal_factory(kind, run_folder / "journal.db").open()
    try:
        async with client_for(server) as client:
            started = time.perf_counter()
            report = await run_batch(
                client, requests_for(jobs, image, kind), journal, run_folder / "out"
            )
            elapsed = time.perf_counter() - started
    finally:
        journal.close()
    assert report.completed == jobs, report
    return elapsed


async def generate_many_run(server: str, jobs: int, image: Path) -> float:
    async with client_for(server) as client:
        started = time.perf_counter()
        done = 0
        async for item in client.generate_many(requests_for(jobs, image, "many")):
            assert item.ok, item.error
            done += 1
        elapsed = time.perf_counter() - started
    assert done == jobs
    return elapsed


async def main(quick: bool) -> None:
    runs = 3 if quick else 5
    journal_jobs = 500 if quick else 2000
    engine_jobs = 100 if quick else 300
    with tempfile.TemporaryDirectory(prefix="dreamo-bench-") as scratch:
        folder = Path(scratch)
        image = folder / "ref.png"
        image.write_bytes(make_png(256, 256))

        print(
            f"(a) journal alone: 4 writes per job, {CONCURRENCY} jobs at a time, "
            f"{journal_jobs} jobs, median of {runs} [{interpreter()}]"
        )
        print(f"    {'journal':<40}{'µs/job':>10}{'x baseline':>12}")
        rounds: dict[str, list[float]] = {"memory": [], "none": [], "critical": [], "all": []}
        for _ in range(runs):  # interleaved, so drift hits every kind alike
            for kind in rounds:
                rounds[kind].append(await journal_only(kind, journal_jobs, folder))
        base = statistics.median(rounds["memory"])
        labels = {
            "memory": "in-memory, caller thread (baseline)",
            "none": "WAL, never fsynced",
            "critical": "WAL, fsync sending/created (default)",
            "all": "WAL, fsync every commit",
        }
        for kind, values in rounds.items():
            value = statistics.median(values)
            print(f"    {labels[kind]:<40}{value:>10.1f}{value / base:>12.2f}")

        with fake_server_process("--task-duration-ms", "20") as server:
            print(
                f"\n(b)+(c) against FakeDreamOServer in another process (20 ms tasks), "
                f"concurrency {CONCURRENCY}, "
                f"{engine_jobs} jobs, median of {runs}"
            )
            await generate_many_run(server, 20, image)  # warm up connections and threads
            times: dict[str, list[float]] = {"many": [], "memory": [], "critical": []}
            for _ in range(runs):
                times["many"].append(await generate_many_run(server, engine_jobs, image))
                for kind in ("memory", "critical"):
                    times[kind].append(await engine_run(server, kind, engine_jobs, image, folder))
            many = statistics.median(times["many"])
            memory = statistics.median(times["memory"])
            full = statistics.median(times["critical"])
            print(f"    {'run':<48}{'jobs/s':>9}{'x generate_many':>17}")
            rows = [
                ("generate_many (baseline: no journal, no files)", many),
                ("run_batch, in-memory journal, downloads", memory),
                ("run_batch, durable journal, downloads (dreamo)", full),
            ]
            for label, seconds in rows:
                print(f"    {label:<48}{engine_jobs / seconds:>9.1f}{many / seconds:>17.2f}")
            overhead = (full - memory) / engine_jobs * 1e6
            print(
                f"\n    journal overhead inside the engine: {overhead:.0f} µs per job "
                f"(durable minus in-memory, wall time / jobs)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and jobs")
    asyncio.run(main(parser.parse_args().quick))
