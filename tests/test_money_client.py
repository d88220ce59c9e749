"""Issue 13, the client's side: every job's money state is explicit, and no paid task is lost.

Each test reproduces a case over real HTTP with FakeDreamOServer and a fault.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import dreamo_async as d
from dreamo_async import MoneyState
from dreamo_async.testing import FakeDreamOServer, Fault, make_png

from .conftest import eventually
from .helpers import FAST_POLL, KEY, client_for

PNG = make_png(32, 32)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=30) as fake:
        yield fake


def ours() -> list[asyncio.Task[Any]]:
    """Asyncio tasks still alive on this loop, but the test's and the fake server's."""
    current = asyncio.current_task()
    return [
        t
        for t in asyncio.all_tasks()
        if t is not current
        and not t.done()
        and not t.get_coro().__qualname__.startswith("RequestHandler")  # type: ignore[union-attr]
    ]


async def drain(stream: AsyncIterator[d.BatchItem], into: list[d.BatchItem] | None = None) -> None:
    async for item in stream:
        if into is not None:
            into.append(item)


# -- case 1: closed or cancelled while a create is in flight ---------------------------


async def test_closing_during_a_create_in_flight_is_an_unknown_outcome(
    server: FakeDreamOServer,
) -> None:
    server.inject("create", Fault.slow(500))
    client = client_for(server)
    job = asyncio.create_task(client.generate(prompt="p", images=[PNG]))
    await eventually(lambda: server.stats.create_requests == 1)
    await asyncio.sleep(0.1)
    await client.aclose()
    with pytest.raises(d.CreateOutcomeUnknownError) as info:
        await job
    error = info.value
    assert error.money_state is MoneyState.OUTCOME_UNKNOWN
    assert error.unknown_task_possible
    assert not error.nothing_sent
    assert error.request_id == server.last_create_headers["X-Request-Id"]  # type: ignore[index]
    assert "nothing was sent" not in str(error)
    assert ours() == []


async def test_closing_a_queued_job_says_nothing_was_sent(server: FakeDreamOServer) -> None:
    client = client_for(server, max_concurrency=1)
    holder = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
    queued = asyncio.create_task(client.generate(prompt="q", images=[PNG]))
    await eventually(lambda: server.stats.polls >= 1)
    await client.aclose()
    outcomes = await asyncio.gather(holder, queued, return_exceptions=True)
    assert all(isinstance(o, d.ClientClosedError) for o in outcomes), outcomes
    held, waiting = outcomes
    assert isinstance(held, d.DreamOError)
    assert isinstance(waiting, d.DreamOError)
    assert held.money_state is MoneyState.CREATED
    assert held.task_id in server.tasks
    assert waiting.nothing_sent
    assert "nothing was sent" in str(waiting)


async def test_a_job_cancelled_during_its_create_keeps_the_task_it_made(
    server: FakeDreamOServer,
) -> None:
    """The create goes on in the background: its task is known, watched, and waitable."""
    server.inject("create", Fault.slow(300))
    async with client_for(server, max_concurrency=1) as client:
        job = asyncio.create_task(client.generate(prompt="p", images=[PNG]))
        await eventually(lambda: server.stats.create_requests == 1)
        await asyncio.sleep(0.1)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert client.statistics().jobs_running == 1  # the create still holds the slot
        await eventually(lambda: server.stats.creates == 1)
        (task_id,) = server.tasks
        await eventually(lambda: client.statistics().jobs_running == 0)  # watched to its end
        polls = server.stats.polls
        result = await client.wait(task_id)
        assert result.task_id == task_id
        assert server.stats.polls == polls  # the kept result, without a request
        assert client.statistics().jobs_running == 0
    assert server.stats.create_requests == 1


# -- case 5: abandoned tasks keep their slots ----------------------------------------------


async def test_timed_out_jobs_keep_their_slots_and_results(
    server: FakeDreamOServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.task_duration_ms = 500
    caplog.set_level(logging.WARNING, "dreamo_async")
    async with client_for(server, max_concurrency=2) as client:
        outcomes = await asyncio.gather(
            *(client.generate(prompt=f"p{i}", images=[PNG], timeout=0.1) for i in range(6)),
            return_exceptions=True,
        )
        assert server.stats.max_open_tasks <= 2  # never more than max_concurrency at the service
        timeouts = [o for o in outcomes if isinstance(o, d.TaskTimeoutError)]
        assert len(timeouts) == 6, outcomes
        assert all(o.money_state is MoneyState.CREATED for o in timeouts)
        # every task was named in a warning
        for error in timeouts:
            assert any(error.task_id in r.getMessage() for r in caplog.records)
        await eventually(lambda: client.statistics().tasks_watched == 0)
        polls = server.stats.polls
        results = [await client.wait(o.task_id) for o in timeouts]
        assert server.stats.polls == polls  # every result was kept: no request
        assert {r.task_id for r in results} == {o.task_id for o in timeouts}
    assert server.stats.create_requests == 6


async def test_log_records_carry_text_not_errors_that_would_keep_the_client_alive(
    server: FakeDreamOServer,
) -> None:
    # A handler that keeps records (a test runner, a memory handler, an error tracker's
    # breadcrumbs) would otherwise keep each error's traceback: the job, its client and
    # its buffers. Found by the chaos run's memory figure under pytest-xdist.
    kept: list[logging.LogRecord] = []

    class KeepEveryRecord(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = KeepEveryRecord(logging.DEBUG)
    library = logging.getLogger("dreamo_async")
    library.addHandler(handler)
    level = library.level
    library.setLevel(logging.DEBUG)
    try:
        async def time_out_and_stop_watching() -> weakref.ref[d.DreamOClient]:
            async with client_for(server, poll=attrs.evolve(FAST_POLL, timeout=0.2)) as client:
                with pytest.raises(d.TaskTimeoutError):
                    await client.generate(prompt="p [never]", images=[PNG], timeout=0.05)
                await eventually(lambda: client.statistics().tasks_watched == 0)
            return weakref.ref(client)

        gone = await time_out_and_stop_watching()
        assert any("stopped watching" in r.getMessage() for r in kept)
        gc.collect()
        assert gone() is None
        for record in kept:
            assert not any(isinstance(arg, BaseException) for arg in record.args or ())
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


async def test_asyncio_timeout_around_generate_leaves_the_task_watched(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server) as client:
        with pytest.raises(TimeoutError) as info:
            async with asyncio.timeout(0.1):
                await client.generate(prompt="p [never]", images=[PNG])
        (task_id,) = server.tasks
        assert client.statistics().tasks_watched == 1
        cause = info.value.__cause__
        assert cause is not None
        assert any(task_id in note for note in cause.__notes__)
        server.finish_task(task_id)
        assert (await client.wait(task_id, timeout=5)).task_id == task_id


async def test_aclose_stops_watching_at_once(server: FakeDreamOServer) -> None:
    client = client_for(server)
    with pytest.raises(d.TaskTimeoutError):
        await client.generate(prompt="p [never]", images=[PNG], timeout=0.05)
    assert client.statistics().tasks_watched == 1
    started = time.monotonic()
    await client.aclose()
    assert time.monotonic() - started < 1.0
    assert ours() == []
    assert client.statistics().tasks_watched == 0
    assert not client._transport.is_open
    polls = server.stats.polls
    await asyncio.sleep(0.1)
    assert server.stats.polls == polls


# -- case 9: generate_many never drops paid results ---------------------------------------


async def test_generate_many_yields_finished_results_before_raising(
    server: FakeDreamOServer,
) -> None:
    requests: list[d.GenerationParams] = [
        {"prompt": "slow head [slow:400]", "images": [PNG]},
        {"prompt": "fast 1", "images": [PNG]},
        {"prompt": "fast 2", "images": [PNG]},
        {"prompt": "fails [slow:150] [fail:003013095]", "images": [PNG]},
    ]
    got: list[d.BatchItem] = []
    async with client_for(server, max_concurrency=4) as client:
        stream = client.generate_many(requests, ordered=True, return_exceptions=False)
        with pytest.raises(d.TaskFailedError):
            await drain(stream, got)
    assert [item.index for item in got] == [1, 2]  # paid, finished: yielded, not dropped
    assert all(item.ok for item in got)


# -- case 12: checked before the job queues -------------------------------------------------


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "5"])
async def test_a_bad_timeout_is_refused_before_anything_is_sent(
    server: FakeDreamOServer, timeout: Any
) -> None:
    async with client_for(server) as client:
        with pytest.raises(d.InvalidRequestError) as info:
            await client.generate(prompt="p", images=[PNG], timeout=timeout)
        assert info.value.parameter == "timeout"
        with pytest.raises(d.InvalidRequestError):
            await drain(client.generate_many([{"prompt": "p", "images": [PNG]}], timeout=timeout))
    assert server.stats.create_requests == 0


async def test_a_missing_file_is_reported_before_the_job_queues(
    server: FakeDreamOServer, tmp_path: Path
) -> None:
    async with client_for(server, max_concurrency=1) as client:
        holder = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
        await eventually(lambda: server.stats.creates == 1)
        with pytest.raises(d.ImageError, match="does not exist"):
            await asyncio.wait_for(
                client.generate(prompt="q", images=[tmp_path / "missing.png"]), 1.0
            )
        with pytest.raises(d.ImageError, match="directory"):
            await asyncio.wait_for(client.submit(prompt="q", images=[tmp_path]), 1.0)
        holder.cancel()
    assert server.stats.create_requests == 1


# -- case 3: text that cannot be sent; unexpected failures after sending --------------------


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"prompt": "a cat \ud800"}, "prompt"),
        ({"prompt": "p", "images": ["https://example.com/\udc80.png"]}, "images[0]"),
        ({"prompt": "p", "model": "spark\ud800"}, "model"),
    ],
)
def test_text_that_cannot_be_sent_is_refused_at_construction(
    params: dict[str, Any], parameter: str
) -> None:
    with pytest.raises(d.InvalidRequestError) as info:
        d.GenerationRequest(**{"images": [PNG], **params})
    assert info.value.parameter == parameter


async def test_an_unexpected_failure_after_sending_is_an_unknown_outcome(
    server: FakeDreamOServer,
) -> None:
    answer = {"id": "t-odd", "status": "pending", "created_at": "²"}
    server.inject("create", Fault.wrong_shape(payload=answer))
    async with client_for(server) as client:
        with pytest.raises(d.DreamOError) as info:
            await client.generate(prompt="p", images=[PNG])
    error = info.value
    assert error.money_state in (MoneyState.OUTCOME_UNKNOWN, MoneyState.CREATED)
    assert error.request_id is not None
    assert not error.nothing_sent


# -- case 13: DREAMO_BASE_URL ---------------------------------------------------------------


async def test_the_base_url_comes_from_the_environment(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DREAMO_BASE_URL", server.url)
    async with d.DreamOClient(api_key=KEY, poll=d.PollPolicy(initial_delay=0.01)) as client:
        assert f"base_url={server.url}" in repr(client)
        await client.generate(prompt="p", images=[PNG])
    assert server.stats.creates == 1
    explicit = d.DreamOClient(api_key=KEY, base_url="https://proxy.example")
    assert "https://proxy.example" in repr(explicit)  # the argument wins


# -- case 14: one client, two event loops ---------------------------------------------------


# The first run ends with a pooled connection of its loop open: once that loop is closed
# nobody can close it, and the garbage collector does (with this warning).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_one_client_under_two_asyncio_runs() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeDreamOServer(api_key=KEY, task_duration_ms=10)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result()
    try:
        client = client_for(server)  # made outside any loop, as at import time
        first = asyncio.run(client.generate(prompt="p1", images=[PNG]))
        second = asyncio.run(client.generate(prompt="p2", images=[PNG]))
        asyncio.run(client.aclose())
        gc.collect()  # the first loop's connection, now, under this test's filter
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    assert first.task_id != second.task_id


async def test_one_client_from_two_threads_is_a_configuration_error(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server) as client:
        await client.generate(prompt="p", images=[PNG])
        with pytest.raises(d.ConfigurationError, match="one client per thread"):
            await asyncio.to_thread(asyncio.run, client.generate(prompt="q", images=[PNG]))
    assert server.stats.creates == 1


# -- case 15: file objects ------------------------------------------------------------------


class SlowFile(io.BytesIO):
    """A file object whose reads take a while (a network file system), releasing the GIL."""

    def read(self, size: int | None = -1) -> bytes:
        time.sleep(0.005)
        return super().read(size)


async def test_one_file_object_shared_by_concurrent_jobs(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dreamo_async.images.prepare._stage_threads", lambda: 4)
    shared = SlowFile(PNG)
    async with client_for(server, max_concurrency=6) as client:
        results = await asyncio.gather(
            *(client.generate(prompt=f"p{i}", images=[shared]) for i in range(6))
        )
    assert len(results) == 6
    assert shared.tell() == 0


def test_a_bare_file_object_is_one_image(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG + b"\n" * 3)  # newlines: iterated, it would be several "lines"
    with path.open("rb") as handle:
        assert len(d.GenerationRequest(prompt="p", images=handle).images) == 1
    text = tmp_path / "notes.txt"
    text.write_text("a\nb\n")
    with text.open() as handle, pytest.raises(d.ImageError, match="'rb'"):
        d.GenerationRequest(prompt="p", images=handle)


async def test_a_cancelled_job_whose_create_is_refused_sends_it_no_more(
    server: FakeDreamOServer,
) -> None:
    server.inject("create", Fault.status(429, retry_after="0.01").after(300))
    async with client_for(server) as client:
        job = asyncio.create_task(client.generate(prompt="p", images=[PNG]))
        await eventually(lambda: server.stats.create_requests == 1)
        await asyncio.sleep(0.1)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await eventually(lambda: client.statistics().jobs_running == 0)  # the slot came back
        await asyncio.sleep(0.1)
    assert server.stats.create_requests == 1  # the refusal was not followed by a re-send
    assert server.stats.creates == 0


async def test_a_callers_own_cancel_during_close_stays_a_cancellation(
    server: FakeDreamOServer,
) -> None:
    """aclose knows the jobs it ends by state, not by a message: the caller's cancel wins."""
    client = client_for(server)
    job = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
    await eventually(lambda: server.stats.polls >= 1)
    job.cancel("the caller's")
    await client.aclose()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert ours() == []
