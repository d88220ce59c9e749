"""What keeps the event loop free during full-size jobs (issue 14), pinned as mechanisms.

No timing assertions: ``benchmarks/bench_looplag.py`` measures the lag itself.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pybase64
import pytest

from dreamo_async import ClientClosedError, DreamOClient
from dreamo_async._body import WRITE_CHUNK_BYTES, BodyParts
from dreamo_async._turns import STARTS_PER_TURN
from dreamo_async.testing import FakeDreamOServer, make_jpeg, make_png
from dreamo_async.wire import create_body_parts

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"


def _full_size_parts() -> tuple[tuple[bytes, ...], bytes]:
    """A create body with three base64 images of ~2.5 MB (a 1.9 MB JPEG each)."""
    images = [bytes([65 + i]) * (2_500_000 + i) for i in range(3)]
    params = {"prompt": "p", "seed": 1}
    parts = create_body_parts("spark_multi_dreamo", params, images)
    return parts, b"".join(parts)


async def test_large_parts_are_written_in_bounded_slices_with_the_loop_running_between() -> None:
    """No write hands the transport more than WRITE_CHUNK_BYTES, each large slice is
    followed by a drain, and other callbacks run between slices."""
    parts, expected = _full_size_parts()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    class Writer:
        def __init__(self) -> None:
            self.data = bytearray()
            self.writes: list[int] = []
            self.ticks_at_write: list[int] = []
            self.drains = 0

        async def write(self, chunk: bytes | memoryview) -> None:
            self.data += chunk
            self.writes.append(len(chunk))
            self.ticks_at_write.append(ticks)

        async def drain(self) -> None:
            self.drains += 1

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    writer = Writer()
    await BodyParts(parts).write(writer)  # type: ignore[arg-type]
    running.cancel()
    assert bytes(writer.data) == expected
    assert max(writer.writes) <= WRITE_CHUNK_BYTES
    big = [n for n in writer.writes if n == WRITE_CHUNK_BYTES]
    assert len(big) >= 3 * (2_500_000 // WRITE_CHUNK_BYTES)
    assert writer.drains >= len(big)
    # The ticker ran between consecutive large slices: the loop was never held.
    marks = [t for n, t in zip(writer.writes, writer.ticks_at_write, strict=True) if n > 1024]
    assert all(later > earlier for earlier, later in itertools.pairwise(marks))


async def test_full_size_body_reaches_the_service_in_bounded_writes_with_content_length() -> None:
    """Over real HTTP (aiohttp's chunk-sent trace sees every writer write): a known
    length, no chunked encoding, every write bounded, and the service accepts it."""
    parts, expected = _full_size_parts()
    sizes: list[int] = []

    async def on_chunk(
        _session: object, _ctx: object, params: aiohttp.TraceRequestChunkSentParams
    ) -> None:
        sizes.append(len(params.chunk))

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk)
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=0) as server,
        aiohttp.ClientSession(trace_configs=[trace]) as http,
        http.post(
            f"{server.url}/model/v1/generation",
            data=BodyParts(parts),
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response,
    ):
        assert response.request_info.headers["Content-Length"] == str(len(expected))
        assert "Transfer-Encoding" not in response.request_info.headers
        assert response.status < 500
    assert sum(sizes) == len(expected)
    assert max(sizes) <= WRITE_CHUNK_BYTES


_FIRST_JOB = textwrap.dedent(
    """
    import asyncio, json, sys, tempfile, threading
    from pathlib import Path

    import dreamo_async as d
    from dreamo_async.testing import make_jpeg
    from tests.helpers import KEY, threaded_fake_server

    async def main():
        path = Path(tempfile.mkdtemp()) / "ref.jpg"
        path.write_bytes(make_jpeg(640, 480, padding=300_000))  # a file: the worker thread
        async with threaded_fake_server(task_duration_ms=0) as server:
            async with d.DreamOClient(KEY, base_url=server.url) as client:
                modules = set(sys.modules)
                workers = {t.ident for t in threading.enumerate() if "AnyIO" in t.name}
                await client.generate(prompt="a cat", images=[path])
                after = {t.ident for t in threading.enumerate() if "AnyIO" in t.name}
                print(json.dumps({
                    "imported": sorted(set(sys.modules) - modules),
                    "workers_before": len(workers),
                    "new_workers": len(after - workers),
                }))

    asyncio.run(main())
    """
)


def test_first_job_of_a_process_imports_nothing_and_starts_no_thread() -> None:
    """Entering the client loads anyio's thread machinery and starts the stage thread;
    the first job (the first request a web app serves) does neither on the loop."""
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_JOB],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert [m for m in seen["imported"] if m.startswith("anyio")] == []
    assert seen["workers_before"] >= 1
    assert seen["new_workers"] == 0


async def test_release_frees_the_parts_one_per_loop_turn() -> None:
    """After the create, the body's megabytes go a part at a time, other callbacks between."""
    parts, _ = _full_size_parts()
    body = BodyParts(parts)
    del parts
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    count, before = len(body.parts), ticks
    await body.release()
    running.cancel()
    assert body.parts == ()
    assert ticks - before >= count - 1


def test_a_large_result_spills_to_its_file_in_bounded_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the in-memory megabyte, each chunk received writes at most a bounded piece
    on the loop (not the whole megabyte at once); the file ends whole."""
    import dreamo_async.download as download

    writes: list[int] = []
    real_open = download.open_exclusive

    class Recording:
        def __init__(self, handle: BinaryIO) -> None:
            self.handle = handle

        def write(self, data: bytes) -> int:
            writes.append(len(data))
            return self.handle.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(self.handle, name)

    monkeypatch.setattr(download, "open_exclusive", lambda path: Recording(real_open(path)))
    data = os.urandom(3 * download.SPILL_BYTES + 12_345)
    part = download._PartFile(tmp_path, "00000-t1-0").begin()
    for start in range(0, len(data), 64 * 1024):
        part(data[start : start + 64 * 1024])
    assert max(writes) <= download.SPILL_PIECE_BYTES
    assert len(part.buffer) <= download.SPILL_BYTES + 64 * 1024
    final = tmp_path / "00000-t1-0.jpg"
    part.commit(final)
    assert final.read_bytes() == data


def _anyio_workers() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident and "AnyIO" in t.name}


async def test_a_burst_of_jobs_with_files_checks_them_on_one_thread(tmp_path: Path) -> None:
    """Twenty jobs started together (a web app's burst) check their paths one at a time:
    no worker thread per job, whose starts each held the event loop."""
    paths = []
    for n in range(2):
        path = tmp_path / f"ref{n}.jpg"
        path.write_bytes(make_jpeg(640, 480, padding=20_000))
        paths.append(path)
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=0) as server,
        DreamOClient(KEY, base_url=server.url, max_concurrency=4) as client,
    ):
        before = _anyio_workers()
        await asyncio.gather(
            *(client.generate(prompt="a cat", images=list(paths)) for _ in range(20))
        )
        new = _anyio_workers() - before
    # The stage thread (started on entering) and at most one more for the checks.
    assert len(new) <= 1


async def test_a_burst_of_calls_starts_a_few_jobs_per_loop_turn_in_call_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty calls made in one loop turn (fifty web handlers woken by one read) run
    their synchronous start (the request check, the images' classification) a few per
    loop turn, in call order: the loop is never held for all of them at once."""
    loop = asyncio.get_running_loop()
    turn, counting = 0, True

    def count_turns() -> None:  # runs once per loop turn while counting
        nonlocal turn
        turn += 1
        if counting:
            loop.call_soon(count_turns)

    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=0) as server,
        DreamOClient(KEY, base_url=server.url, max_concurrency=4) as client,
    ):
        starts: list[tuple[int, str]] = []
        build = client.build_request

        def counted_build(*args: Any, **params: Any) -> Any:
            starts.append((turn, params["prompt"]))
            return build(*args, **params)

        monkeypatch.setattr(client, "build_request", counted_build)
        loop.call_soon(count_turns)
        png = make_png(64, 64)
        await asyncio.gather(*(client.generate(prompt=f"p{i}", images=[png]) for i in range(20)))
        counting = False
    per_turn = collections.Counter(t for t, _ in starts)
    assert max(per_turn.values()) == STARTS_PER_TURN, per_turn
    assert len(per_turn) == math.ceil(20 / STARTS_PER_TURN), per_turn
    assert [prompt for _, prompt in starts] == [f"p{i}" for i in range(20)]


async def test_a_call_cancelled_while_waiting_its_turn_sends_nothing_and_blocks_no_one() -> None:
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=0) as server,
        DreamOClient(KEY, base_url=server.url, max_concurrency=16) as client,
    ):
        png = make_png(64, 64)
        count = STARTS_PER_TURN + 2
        jobs = [
            asyncio.create_task(client.generate(prompt=f"p{i}", images=[png])) for i in range(count)
        ]
        await asyncio.sleep(0)  # the first STARTS_PER_TURN start, the others wait
        jobs[STARTS_PER_TURN].cancel()
        results = await asyncio.gather(*(job for n, job in enumerate(jobs) if n != STARTS_PER_TURN))
        assert jobs[STARTS_PER_TURN].cancelled()
        assert server.stats.creates == count - 1
        assert f"p{STARTS_PER_TURN}" not in server.stats.creates_by_prompt
        assert len({result.task_id for result in results}) == count - 1


async def test_a_call_waiting_its_turn_when_the_client_closes_says_nothing_was_sent() -> None:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=0) as server:
        client = DreamOClient(KEY, base_url=server.url, max_concurrency=16)
        png = make_png(64, 64)
        jobs = [
            asyncio.create_task(client.generate(prompt=f"p{i}", images=[png]))
            for i in range(STARTS_PER_TURN + 1)
        ]
        await asyncio.sleep(0)  # the last one waits for its turn
        await client.aclose()
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        last = outcomes[-1]
        assert isinstance(last, ClientClosedError), outcomes
        assert last.nothing_sent
        assert f"p{STARTS_PER_TURN}" not in server.stats.creates_by_prompt


async def test_the_stage_thread_reads_and_encodes_a_piece_at_a_time_yielding_after_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real HTTP, files of about 1 MB: every read and every base64 step of the
    worker thread handles at most PIECE_BYTES and is followed by a yield of its CPU,
    so a woken event loop never waits for a long step; the pieces reach the service
    as the files' base64. Fails with whole-file reads or encodes, or without yields."""
    import dreamo_async.images.prepare as prepare
    import dreamo_async.images.read as read
    import dreamo_async.images.slices as slices

    if hasattr(os, "sched_yield"):
        assert slices.yield_cpu is os.sched_yield
    events: list[tuple[str, int, int]] = []  # (step, bytes, thread)
    real_encode = pybase64.b64encode

    def encode(data: bytes | memoryview) -> bytes:
        events.append(("encode", len(data), threading.get_ident()))
        return real_encode(data)

    class RecordedFile:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._file: BinaryIO = open(*args, **kwargs)  # type: ignore[call-overload]  # noqa: SIM115

        def __enter__(self) -> RecordedFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

        def fileno(self) -> int:
            return self._file.fileno()

        def readinto(self, buffer: memoryview) -> int | None:
            count = self._file.readinto(buffer)  # type: ignore[attr-defined]
            if count:
                events.append(("read", len(buffer), threading.get_ident()))
            return count  # type: ignore[no-any-return]

    def recorded_yield() -> None:
        events.append(("yield", 0, threading.get_ident()))

    monkeypatch.setattr(pybase64, "b64encode", encode)
    monkeypatch.setattr(read, "open", RecordedFile, raising=False)
    for module in (read, slices, prepare):
        monkeypatch.setattr(module, "yield_cpu", recorded_yield)
    paths = []
    for n in range(3):
        path = tmp_path / f"ref{n}.jpg"
        path.write_bytes(make_jpeg(640, 480, padding=1_000_000 + n))
        paths.append(path)
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=0) as server,
        DreamOClient(KEY, base_url=server.url) as client,
    ):
        await client.generate(prompt="a cat", images=paths)
        sent = server.last_request()
    assert sent is not None
    assert sent.json()["input"][0]["params"]["binary_data_base64"] == [
        real_encode(path.read_bytes()).decode() for path in paths
    ]
    steps = [(name, size) for name, size, _ in events]
    work = [size for name, size in steps if name != "yield"]
    assert max(work) <= slices.PIECE_BYTES
    assert sum(1 for name, _ in steps if name == "encode") >= 3 * 3  # 1 MB: 3 pieces each
    for (name, _), (after, _) in itertools.pairwise(steps):
        if name != "yield":
            assert after == "yield", steps
    assert threading.get_ident() not in {ident for _, _, ident in events}


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_a_fresh_threads_first_read_touches_only_the_pages_it_reads(tmp_path: Path) -> None:
    """A worker thread's read buffer is sized by the cap (12 MB here) but a 200 KB file
    must not make the process resident in all of it: zero-filling the whole buffer at
    once held the GIL for milliseconds at each thread's first job. Fails with a
    ``bytearray`` buffer (its 12 MB are written before the read)."""
    from dreamo_async.images.read import _read_path

    path = tmp_path / "small.jpg"
    path.write_bytes(make_jpeg(64, 64, padding=200_000))
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    grown: list[int] = []

    def first_read() -> None:
        before = resident()
        data = _read_path(path, 12_000_000)
        grown.append(resident() - before)
        assert bytes(data) == path.read_bytes()

    thread = threading.Thread(target=first_read)
    thread.start()
    thread.join()
    assert len(grown) == 1
    assert grown[0] < 4_000_000, grown
