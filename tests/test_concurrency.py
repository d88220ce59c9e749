"""Many jobs through one client: slots, cancellation, deadlines, close, bulk.

Every guarantee is counted at FakeDreamOServer's side: most tasks open at once,
creates per job, requests after a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import anyio
import pytest

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, Fault, make_png

from .conftest import assert_no_more_requests, eventually, landed
from .helpers import KEY, client_for

PNG = make_png(32, 32)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=30) as fake:
        yield fake


def leftovers(client: d.DreamOClient) -> dict[str, int]:
    """What a finished or cancelled job could leave behind, by kind."""
    current = asyncio.current_task()
    limiter = client._transport.limiter
    connector = client._transport.session.connector
    ours = [
        t
        for t in asyncio.all_tasks()
        if t is not current
        and not t.done()
        and not t.get_coro().__qualname__.startswith("RequestHandler")  # type: ignore[union-attr]
    ]  # (the fake server's own connection handlers run on this loop too)
    return {
        "tasks": len(ours),
        "timers": int(getattr(limiter, "_timer", None) is not None),
        "connections in use": len(getattr(connector, "_acquired", ())),
        "slots": client.statistics().jobs_running,
    }


async def cancel_and_check_silence(
    job: asyncio.Task[Any], server: FakeDreamOServer, client: d.DreamOClient
) -> None:
    """Cancel ``job``; it sends no new create, its task is watched until it ends, and
    then no request reaches the server and nothing is left over."""
    creates = server.stats.create_requests
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await finish_watched(server, client)
    assert server.stats.create_requests == creates
    assert leftovers(client) == dict.fromkeys(leftovers(client), 0)


async def finish_watched(server: FakeDreamOServer, client: d.DreamOClient) -> None:
    """End every task at the service; the client's watchers then stop, and so do requests."""

    def ended() -> bool:
        for task_id in list(server.tasks):  # creates of cancelled jobs may still land
            server.finish_task(task_id)
        return client.statistics().tasks_watched == 0 and not client._watcher.background

    await eventually(ended)
    await assert_no_more_requests(server, quiet=0.1)


async def test_gather_holds_slots_rate_and_creates_once(server: FakeDreamOServer) -> None:
    async with client_for(server, max_concurrency=5, requests_per_second=80, burst=3) as client:
        results = await asyncio.gather(
            *(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(25))
        )
        assert leftovers(client) == dict.fromkeys(leftovers(client), 0)
    assert len({r.task_id for r in results}) == 25
    assert server.stats.creates == 25
    assert server.stats.max_open_tasks <= 5
    assert server.stats.max_requests_in_window(1.0) <= 83
    assert set(server.stats.creates_by_request_id.values()) == {1}


async def test_slots_are_fifo(server: FakeDreamOServer) -> None:
    async with client_for(server, max_concurrency=1) as client:
        jobs = []
        for i in range(6):
            jobs.append(asyncio.create_task(client.generate(prompt=f"p{i}", images=[PNG])))
            await asyncio.sleep(0)  # each queues in turn
        await asyncio.gather(*jobs)
    assert [task.prompt for task in server.tasks.values()] == [f"p{i}" for i in range(6)]
    assert server.stats.max_open_tasks == 1


async def test_cancel_while_polling_stops_requests_and_frees_the_slot(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server, max_concurrency=1, requests_per_second=200) as client:
        job = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
        await eventually(lambda: server.stats.polls >= 3)
        await cancel_and_check_silence(job, server, client)
        # the slot is really free: the next job runs at once
        await client.generate(prompt="next", images=[PNG])
    assert server.stats.creates == 2


async def test_cancel_while_queued_for_a_slot_or_the_limiter_sends_nothing(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server, max_concurrency=1, requests_per_second=5) as client:
        holder = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
        queued = asyncio.create_task(client.generate(prompt="queued", images=[PNG]))
        await eventually(lambda: server.stats.creates == 1)
        assert client.statistics().jobs_waiting == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert client.statistics().jobs_waiting == 0
        # holder is now waiting in the limiter (5 req/s) for its next poll: cancel it there
        await cancel_and_check_silence(holder, server, client)
    assert server.stats.creates_by_prompt["queued"] == 0
    assert server.stats.create_requests == 1


async def test_asyncio_timeout_and_anyio_fail_after_behave(server: FakeDreamOServer) -> None:
    async with client_for(server, max_concurrency=2) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.generate(prompt="p [never]", images=[PNG])
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.1):
                await client.generate(prompt="p [never]", images=[PNG])
        assert client.statistics().tasks_watched == 2  # both paid tasks left a trace
        await finish_watched(server, client)
        assert leftovers(client) == dict.fromkeys(leftovers(client), 0)
        # the task is not cancelled for good: the client keeps working
        assert (await client.generate(prompt="after", images=[PNG])).task_id
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_closing_cancels_running_and_queued_jobs_with_client_closed_error(
    server: FakeDreamOServer,
) -> None:
    client = client_for(server, max_concurrency=2)
    jobs = [
        asyncio.create_task(client.generate(prompt=f"p{i} [never]", images=[PNG])) for i in range(5)
    ]
    await eventually(lambda: server.stats.polls >= 2)
    await client.aclose()
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    assert all(isinstance(o, d.ClientClosedError) for o in outcomes), outcomes
    # The two running jobs had created tasks (paid for): their errors name them, so
    # the caller can resume; the queued ones had none.
    named = [o.task_id for o in outcomes if isinstance(o, d.ClientClosedError) and o.task_id]
    assert sorted(named) == sorted(server.tasks)
    assert all(
        f"task {task_id} exists" in str(o) for o, task_id in zip(outcomes, named, strict=False)
    )
    await assert_no_more_requests(server)
    assert server.stats.creates == 2  # the three queued jobs never created anything


async def test_generate_many_pulls_lazily_from_an_endless_generator(
    server: FakeDreamOServer,
) -> None:
    pulled = 0

    def endless() -> Iterator[d.GenerationParams]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield {"prompt": f"p{i}", "images": [PNG]}

    async with client_for(server, max_concurrency=3) as client:
        stream = client.generate_many(endless())
        got = []
        async for item in stream:
            got.append(item)
            if len(got) == 10:
                break
        await stream.aclose()
        await finish_watched(server, client)  # the cancelled jobs' tasks were watched
        assert leftovers(client)["tasks"] == 0
    assert pulled <= 10 + 4 * 3  # what was yielded plus a window of about 2 x slots


async def test_generate_many_ordered_with_progress_and_failures(server: FakeDreamOServer) -> None:
    requests: list[d.GenerationParams] = [
        {
            "prompt": f"p{i} [slow:{(7 - i) * 10}]" + (" [fail:003013095]" if i == 2 else ""),
            "images": [PNG],
        }
        for i in range(7)
    ]
    requests.append({"prompt": "bad", "images": [PNG], "ddim_steps": 99})
    progress: list[d.BatchProgress] = []
    async with client_for(server, max_concurrency=4) as client:
        items = [
            item
            async for item in client.generate_many(
                requests, ordered=True, on_progress=progress.append
            )
        ]
    assert [item.index for item in items] == list(range(8))
    assert [item.ok for item in items] == [True, True, False, True, True, True, True, False]
    assert isinstance(items[2].error, d.TaskFailedError)
    assert isinstance(items[7].error, d.InvalidRequestError)
    last = progress[-1]
    assert (last.done, last.failed, last.total) == (8, 2, 8)
    assert last.cost == Decimal("0.18")
    assert [p.done for p in progress] == list(range(1, 9))


async def test_generate_many_without_return_exceptions_raises_and_stops(
    server: FakeDreamOServer,
) -> None:
    requests: list[d.GenerationParams] = [{"prompt": "p [fail:003013099]", "images": [PNG]}]
    requests += [{"prompt": f"p{i} [never]", "images": [PNG]} for i in range(5)]
    async with client_for(server, max_concurrency=3) as client:
        with pytest.raises(d.TaskFailedError):
            async for _ in client.generate_many(requests, return_exceptions=False):
                pass
        await landed()  # a create in flight at the raise goes on (and is watched)
        creates = server.stats.create_requests
        await finish_watched(server, client)  # the other jobs were cancelled, tasks watched
        assert server.stats.create_requests == creates
        assert leftovers(client) == dict.fromkeys(leftovers(client), 0)


async def test_generate_many_timeout_none_means_no_deadline(server: FakeDreamOServer) -> None:
    """``None`` is "no deadline", not "the policy's default" (here 0.1 s)."""
    policy = d.PollPolicy(initial_delay=0.01, max_delay=0.02, jitter=0.0, timeout=0.1)
    async with client_for(server, poll=policy) as client:
        requests: list[d.GenerationParams] = [{"prompt": "p [slow:300]", "images": [PNG]}]
        items = [item async for item in client.generate_many(requests, timeout=None)]
        assert items[0].ok, items[0].error
        with pytest.raises(d.TaskTimeoutError):  # the default still applies when not given
            await client.generate(prompt="p [slow:300]", images=[PNG])


async def test_generate_many_ordered_holds_a_bounded_window_behind_a_slow_head(
    server: FakeDreamOServer,
) -> None:
    """A slow first job must not let finished later ones pile up without bound."""
    pulled = 0

    def requests() -> Iterator[d.GenerationParams]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield {"prompt": f"p{i}" + (" [slow:500]" if i == 0 else ""), "images": [PNG]}

    client = client_for(server, max_concurrency=2)
    async with client, contextlib.aclosing(client.generate_many(requests(), ordered=True)) as items:
        first = await anext(items)
    assert first.index == 0
    assert pulled <= 2 * 2 + 1  # the window (2 x slots) plus the one being read


async def test_a_retry_that_wakes_after_close_raises_client_closed(
    server: FakeDreamOServer,
) -> None:
    """A poll waiting to retry when the client closes ends typed, not with aiohttp's
    RuntimeError('Session is closed'), and sends nothing more."""
    client = client_for(server, retry=d.RetryPolicy(initial_delay=0.2, max_delay=0.2))
    task = await client.submit(prompt="p", images=[PNG])
    server.inject("poll", Fault.status(503), times=5)
    poll = asyncio.ensure_future(client.get_task(task.id))
    await eventually(lambda: server.stats.polls >= 1)
    await client.aclose()
    seen = server.stats.requests
    with pytest.raises(d.ClientClosedError):
        await poll
    assert server.stats.requests == seen
