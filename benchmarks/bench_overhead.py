"""The library's own work per tiny job, measured two steady ways (for hot-path work).

Run from the repository root::

    .venv/bin/python benchmarks/bench_overhead.py

Throughput on a shared machine moves by ±15% between runs, too much to see a change
of a few microseconds. Two figures that do not move with the machine's load:

* **bytecodes per job**: every Python bytecode executed while ``jobs`` tiny jobs
  (create + one poll) run against the fake server in another process, counted with
  ``sys.settrace``, for the library and for the bare aiohttp loop of
  ``bench_throughput.py``, split by where they run (ours, aiohttp, asyncio, other).
  C code is not counted, so it is a proxy, but a repeatable one.
* **library work per job, transport stubbed out**: ``client.generate`` against an
  in-memory session that answers at once (one trip round the loop per request, as a
  fast server), against the same loop written bare; the minimum CPU time of several
  rounds, so the difference is the library's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multidict import CIMultiDict, CIMultiDictProxy

import dreamo_async as d
from benchmarks._common import fake_server_process, print_table
from benchmarks.bench_throughput import (
    PNG,
    ZERO_POLL,
    create_body,
    drive,
    run_bare_aiohttp,
    run_library,
)

CREATED = (
    b'{"id":"fake0001","status":"pending","model":"spark_multi_dreamo","created_at":1796015713}'
)
DONE = (
    b'{"id":"fake0001","status":"completed","model":"spark_multi_dreamo",'
    b'"created_at":1796015713,"output":[{"content":[{"type":"image",'
    b'"url":"http://127.0.0.1:1/files/fake0001/0.png","jobId":"job-fake0001"}]}],'
    b'"usage":{"cost":"0.03","discount":1},"metadata":{"completed_at":1796015713}}'
)
HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))


def where(filename: str) -> str:
    if "dreamo_async" in filename and "testing" not in filename:
        return "ours"
    if any(name in filename for name in ("aiohttp", "yarl", "multidict")):
        return "aiohttp"
    if "asyncio" in filename or "selectors" in filename:
        return "asyncio"
    return "other (json, attrs, the loop's body...)"


def count_bytecodes(
    variant: Callable[..., Coroutine[Any, Any, tuple[float, float]]], url: str, jobs: int
) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[where(frame.f_code.co_filename)] += 1
        return tracer

    async def main() -> None:
        sys.settrace(tracer)
        try:
            await variant(url, jobs, 16, "workers")
        finally:
            sys.settrace(None)

    asyncio.run(main())
    return counts


class _Answer:
    """The parts of an aiohttp response the transport reads."""

    status = 200
    content_type = "application/json"
    headers = HEADERS

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.content_length = len(body)

    async def read(self) -> bytes:
        return self.body


class _Exchange:
    def __init__(self, body: bytes) -> None:
        self.answer = _Answer(body)

    async def __aenter__(self) -> _Answer:
        await asyncio.sleep(0)  # one trip round the loop, as for an answer from a socket
        return self.answer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class StubSession:
    """Answers every create (POST) with CREATED and every poll (GET) with DONE, at once.

    ``request`` is what the library's transport calls; ``post`` and ``get`` are for the
    bare loop, as ``aiohttp.ClientSession`` has all three.
    """

    closed = False

    def request(self, method: str, url: object, **options: Any) -> _Exchange:
        return _Exchange(CREATED if method == "POST" else DONE)

    def post(self, url: object, **options: Any) -> _Exchange:
        return _Exchange(CREATED)

    def get(self, url: object, **options: Any) -> _Exchange:
        return _Exchange(DONE)

    async def close(self) -> None:
        self.closed = True


async def stub_library(jobs: int, concurrency: int) -> float:
    client = d.DreamOClient(
        api_key="k" * 40, base_url="http://stub", max_concurrency=concurrency, poll=ZERO_POLL
    )
    client._transport._session = StubSession()  # type: ignore[assignment]

    def one(prompt: str) -> Coroutine[Any, Any, d.GenerationResult]:
        return client.generate(prompt=prompt, images=[PNG])

    async with client:
        return (await drive(one, jobs, concurrency, "workers"))[1]


async def stub_bare(jobs: int, concurrency: int) -> float:
    session = StubSession()

    async def one(prompt: str) -> None:
        async with session.post("create", data=create_body(prompt)) as answer:
            task = json.loads(await answer.read())
        while True:
            async with session.get("task/" + task["id"]) as answer:
                task = json.loads(await answer.read())
            if task["status"] in ("completed", "failed"):
                return
            await asyncio.sleep(0)

    return (await drive(one, jobs, concurrency, "workers"))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs counted (bytecodes)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the stubbed runs")
    args = parser.parse_args()

    with fake_server_process("--task-duration-ms", "0") as url:
        ours = count_bytecodes(run_library, url, args.jobs)
        bare = count_bytecodes(run_bare_aiohttp, url, args.jobs)
    places = sorted(set(ours) | set(bare))
    rows: list[list[Any]] = [
        [place, ours[place] / args.jobs, bare[place] / args.jobs] for place in places
    ]
    total_ours, total_bare = sum(ours.values()) / args.jobs, sum(bare.values()) / args.jobs
    rows.append(["total", total_ours, total_bare])
    rows.append(["library / bare", f"{total_ours / total_bare:.3f}x", ""])
    title = f"Bytecodes per tiny job against the fake server ({args.jobs} jobs, 16 workers)"
    print_table(title, ["where", "library", "bare aiohttp"], rows)

    library = [asyncio.run(stub_library(20_000, 16)) for _ in range(args.rounds)]
    baseline = [asyncio.run(stub_bare(20_000, 16)) for _ in range(args.rounds)]
    print_table(
        f"CPU µs per job, transport stubbed out (min of {args.rounds} rounds of 20,000 jobs)",
        ["library", "bare loop", "library's own work"],
        [[min(library), min(baseline), min(library) - min(baseline)]],
    )


if __name__ == "__main__":
    main()
