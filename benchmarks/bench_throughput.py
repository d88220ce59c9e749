"""Throughput of tiny jobs: the library against a bare aiohttp loop and an httpx client.

Run from the repository root (``make bench`` installs httpx, the ``bench`` extra)::

    .venv/bin/python benchmarks/bench_throughput.py            # 5 runs of each
    .venv/bin/python benchmarks/bench_throughput.py --runs 3 --jobs 1000

A tiny job is one create and one poll: the fake server (another process, so its
CPU does not share the measuring loop) makes tasks that are complete at their
first poll, and the client polls with zero delay. Every variant does the same
HTTP requests with the same body (a 64 x 64 PNG, base64 in JSON) at the same
concurrency:

* ``dreamo_async``: ``client.generate`` with ``max_concurrency=C`` (everything:
  checks, image stage, job slots, limiter, parsing into typed results);
* ``bare aiohttp``: POST create -> GET poll until ``completed``, ``json.loads`` of
  each answer, body built per job (base64 + ``json.dumps``), an ``X-Request-Id``
  on each create as the library sends (the fake server keeps count of them);
* ``httpx``: the same loop on ``httpx.AsyncClient`` (fewer jobs: it is slow).

Each is driven two ways, the library and its baseline always the same way:

* ``workers``: C coroutines call one job after another (a bulk loop);
* ``gather``: ``asyncio.gather`` of one call per job, C at a time (the library's
  job slots bound it; the baselines hold an ``asyncio.Semaphore(C)``): what an app
  firing all its generations at once does, one asyncio task per job.

Printed: jobs/s (median of the runs, variants interleaved), the ratio of the
library to bare aiohttp measured in the same run, and the client's CPU time per
job (``process_time``; steadier than jobs/s on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dreamo_async as d
from benchmarks._common import KEY, fake_server_process, median, print_table
from dreamo_async.testing import make_png

PNG = make_png(64, 64)
CREATE = "/model/v1/generation"
TASK = "/model/v1/generation/task/{id}"
ZERO_POLL = d.PollPolicy(initial_delay=0.0, max_delay=0.0, jitter=0.0, max_relative_delay=None)


class Clock:
    """Wall and CPU time of the measured part (the server runs in another process,
    so ``process_time`` is the client's CPU alone)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def done(self, jobs: int) -> tuple[float, float]:
        """(jobs/s, client CPU microseconds per job)."""
        wall = time.perf_counter() - self.wall
        return jobs / wall, (time.process_time() - self.cpu) / jobs * 1e6


def create_body(prompt: str) -> bytes:
    params = {"prompt": prompt, "binary_data_base64": [base64.b64encode(PNG).decode()]}
    return json.dumps({"model": d.MULTI_IP_MODEL, "input": [{"params": params}]}).encode()


async def drive(
    one: Callable[[str], Coroutine[Any, Any, object]],
    jobs: int,
    concurrency: int,
    mode: str,
    *,
    bounded: bool = False,
) -> tuple[float, float]:
    """Run ``jobs`` calls of ``one`` after one warm-up call, ``concurrency`` at a time;
    returns (jobs/s, client CPU µs per job). ``bounded``: ``one`` limits its own
    concurrency (the library's job slots), so gather needs no semaphore."""
    await one("warm-up")
    clock = Clock()
    if mode == "workers":
        counter = iter(range(jobs))

        async def worker() -> None:
            for i in counter:
                await one(f"p{i}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elif bounded:
        await asyncio.gather(*(one(f"p{i}") for i in range(jobs)))
    else:
        semaphore = asyncio.Semaphore(concurrency)

        async def limited(prompt: str) -> None:
            async with semaphore:
                await one(prompt)

        await asyncio.gather(*(limited(f"p{i}") for i in range(jobs)))
    return clock.done(jobs)


async def run_library(url: str, jobs: int, concurrency: int, mode: str) -> tuple[float, float]:
    async with d.DreamOClient(
        api_key=KEY, base_url=url, max_concurrency=concurrency, poll=ZERO_POLL
    ) as client:

        def one(prompt: str) -> Coroutine[Any, Any, d.GenerationResult]:
            return client.generate(prompt=prompt, images=[PNG])

        return await drive(one, jobs, concurrency, mode, bounded=True)


async def run_bare_aiohttp(url: str, jobs: int, concurrency: int, mode: str) -> tuple[float, float]:
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    post_headers = {**headers, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def one(prompt: str) -> None:
            create_headers = {**post_headers, "X-Request-Id": secrets.token_hex(16)}
            async with session.post(
                url + CREATE, data=create_body(prompt), headers=create_headers
            ) as r:
                task = json.loads(await r.read())
            while True:
                async with session.get(url + TASK.format(id=task["id"]), headers=headers) as r:
                    task = json.loads(await r.read())
                if task["status"] in ("completed", "failed"):
                    return
                await asyncio.sleep(0)

        return await drive(one, jobs, concurrency, mode)


async def run_httpx(url: str, jobs: int, concurrency: int, mode: str) -> tuple[float, float]:
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as http:

        async def one(prompt: str) -> None:
            response = await http.post(
                CREATE,
                content=create_body(prompt),
                headers={"Content-Type": "application/json", "X-Request-Id": secrets.token_hex(16)},
            )
            task: dict[str, Any] = json.loads(response.content)
            while True:
                task = json.loads((await http.get(TASK.format(id=task["id"]))).content)
                if task["status"] in ("completed", "failed"):
                    return
                await asyncio.sleep(0)

        return await drive(one, jobs, concurrency, mode)


Variant = Callable[[str, int, int, str], Coroutine[Any, Any, tuple[float, float]]]
MODES = ("workers", "gather")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per run (httpx: a fifth)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--no-httpx", action="store_true")
    args = parser.parse_args()
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("httpx is not installed (pip install -e '.[bench]'): skipping its column")
        args.no_httpx = True

    variants: dict[str, tuple[Variant, int]] = {
        "dreamo_async": (run_library, args.jobs),
        "bare aiohttp": (run_bare_aiohttp, args.jobs),
    }
    if not args.no_httpx:
        variants["httpx"] = (run_httpx, max(50, args.jobs // 5))
    rows = []
    with fake_server_process("--task-duration-ms", "0") as url:
        for concurrency in args.concurrency:
            for mode in args.mode:
                rows.append(measure(url, variants, concurrency, mode, args.runs))
    headers = [
        "concurrency",
        "driven by",
        *(f"{name} jobs/s" for name in variants),
        "library / bare",
    ]
    if "httpx" in variants:
        headers.append("library / httpx")
    headers += ["library CPU µs/job", "bare CPU µs/job", "CPU library / bare"]
    print_table(f"Tiny jobs (create + 1 poll), medians of {args.runs} runs", headers, rows)


def measure(
    url: str, variants: dict[str, tuple[Variant, int]], concurrency: int, mode: str, runs: int
) -> list[Any]:
    """One row: every variant ``runs`` times, interleaved; ratios taken within each run."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for _ in range(runs):
        for name, (variant, jobs) in variants.items():
            results[name].append(asyncio.run(variant(url, jobs, concurrency, mode)))
        ours, bare = results["dreamo_async"][-1], results["bare aiohttp"][-1]
        ratios.append(ours[0] / bare[0])
        cpu_ratios.append(ours[1] / bare[1])
        shown = {name: f"{r[-1][0]:.0f}/s {r[-1][1]:.0f}µs" for name, r in results.items()}
        print(concurrency, mode, shown, f"ratio {ratios[-1]:.2f}", flush=True)
    row: list[Any] = [concurrency, mode]
    row += [median([r[0] for r in results[name]]) for name in variants]
    row.append(f"{median(ratios):.2f}x")
    if "httpx" in variants:
        lib = median([r[0] for r in results["dreamo_async"]])
        row.append(f"{lib / median([r[0] for r in results['httpx']]):.1f}x")
    row += [median([r[1] for r in results[name]]) for name in ("dreamo_async", "bare aiohttp")]
    row.append(f"{median(cpu_ratios):.2f}x")
    return row


if __name__ == "__main__":
    main()
