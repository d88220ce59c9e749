"""dreamo_async.web: callers that hang up, under a real uvicorn (the FastAPI example).

50 concurrent callers, 20 of which hang up 0.3 s after they called. The client has
6 slots and the first 6 callers' tasks last 1.5 s, so callers that leave are still
queued for a slot: no task may exist for them. Counted at the fake server (its own loop in a
thread, so its clock is this process's monotonic clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from starlette.requests import Request

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer
from examples import aiohttp_app

from .conftest import assert_no_more_requests, eventually
from .helpers import KEY, threaded_fake_server
from .test_examples import image_url, serve_fastapi

SLOTS, CALLERS, LEAVERS, HANG_UP_AFTER = 6, 50, 20, 0.3
IN_FLIGHT = 0.05
FIRST_TASKS_MS, TASKS_MS = 1500, 100


def make_client(server: FakeDreamOServer) -> d.DreamOClient:
    return d.DreamOClient(
        api_key=KEY,
        base_url=server.url,
        max_concurrency=SLOTS,
        requests_per_second=200,
        burst=10,
        poll=d.PollPolicy(initial_delay=0.02, max_delay=0.05, jitter=0.1, timeout=30),
    )


def prompt(i: int) -> str:
    """The first SLOTS callers' tasks hold the slots well past every late hang-up."""
    return f"caller {i} [slow:{FIRST_TASKS_MS}]" if i < SLOTS else f"caller {i}"


async def run_callers(fake: FakeDreamOServer, *, early_leavers: int) -> dict[str, Any]:
    """SLOTS callers first, the 44 others once all slots are taken; late leavers hang
    up HANG_UP_AFTER s after they called, while queued. ``early_leavers`` of the first
    callers hang up just after the others called, while their tasks run."""
    client = make_client(fake)
    ref = image_url(fake)
    left_at: dict[str, float] = {}
    answers: dict[str, int] = {}
    async with serve_fastapi(client) as url, aiohttp.ClientSession() as http:

        async def stay(prompt: str) -> None:
            async with http.post(url, json={"prompt": prompt, "images": [ref]}) as response:
                answers[prompt] = response.status
                await response.read()

        async def leave(prompt: str) -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HANG_UP_AFTER):
                    await stay(prompt)
            left_at[prompt] = time.monotonic()

        def caller(i: int, leaves: bool) -> asyncio.Task[None]:
            return asyncio.create_task((leave if leaves else stay)(prompt(i)))

        first = [caller(i, False) for i in range(SLOTS)]
        await eventually(lambda: len(fake.tasks) >= SLOTS)
        late_leavers = LEAVERS - early_leavers
        rest = [caller(i, i - SLOTS < late_leavers) for i in range(SLOTS, CALLERS)]
        for i, early in enumerate(first[:early_leavers]):
            early.cancel()  # hangs up mid-task (its task was just created, for 1.5 s)
            with contextlib.suppress(asyncio.CancelledError):
                await early
            left_at[prompt(i)] = time.monotonic()
        await asyncio.gather(*first[early_leavers:], *rest)
        await eventually(lambda: client.statistics().jobs_running == 0)
    return {"left_at": left_at, "answers": answers, "stats": fake.stats, "tasks": fake.tasks}


def check(outcome: dict[str, Any]) -> None:
    left_at, answers, stats = outcome["left_at"], outcome["answers"], outcome["stats"]
    assert len(left_at) == LEAVERS
    assert len(answers) == CALLERS - LEAVERS
    assert set(answers.values()) == {200}
    for prompt in answers:
        assert stats.creates_by_prompt[prompt] == 1
    # A leaver has a task only if its create was on its way when the caller hung up
    # (IN_FLIGHT: a create sent as the disconnect arrived lands just after it).
    created_at = {task.prompt: task.created_at for task in outcome["tasks"].values()}
    late = {
        p: (created_at[p], left)
        for p, left in left_at.items()
        if created_at.get(p, 0) > left + IN_FLIGHT
    }
    assert late == {}
    never_created = [p for p in left_at if p not in created_at]
    assert len(never_created) >= LEAVERS // 2  # most left while queued for a slot
    assert stats.max_open_tasks <= SLOTS
    assert set(stats.creates_by_request_id.values()) == {1}
    assert stats.refused_total == 0


async def test_callers_that_hang_up_while_queued_never_get_a_task() -> None:
    async with threaded_fake_server(task_duration_ms=TASKS_MS) as fake:
        outcome = await run_callers(fake, early_leavers=0)
    check(outcome)
    assert not set(outcome["left_at"]) & set(outcome["stats"].creates_by_prompt)


async def test_callers_that_hang_up_mid_task_keep_the_service_within_max_concurrency() -> None:
    async with threaded_fake_server(task_duration_ms=TASKS_MS) as fake:
        outcome = await run_callers(fake, early_leavers=2)
    check(outcome)


async def test_aiohttp_without_handler_cancellation_still_cancels_the_job() -> None:
    """As ``web.run_app`` serves by default (aiohttp's TestServer cancels handlers itself)."""
    async with threaded_fake_server(task_duration_ms=60) as fake:
        client = make_client(fake)
        runner = web.AppRunner(aiohttp_app.create_app(client), handler_cancellation=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            url = f"http://127.0.0.1:{port}/generate"
            async with aiohttp.ClientSession() as http:
                body = {"prompt": "p [slow:600]", "images": [image_url(fake)]}
                caller = asyncio.create_task(http.post(url, json=body))
                await eventually(lambda: fake.stats.polls >= 2)
                caller.cancel()  # the caller hangs up
                with contextlib.suppress(asyncio.CancelledError):
                    await caller
                # the job ended: its paid task keeps the slot, watched until it ends
                await eventually(lambda: client.statistics().tasks_watched == 1)
                await eventually(lambda: client.statistics().jobs_running == 0)
                await assert_no_more_requests(fake, quiet=0.2)
                assert fake.stats.create_requests == 1
        finally:
            await runner.cleanup()


async def test_a_result_ready_as_the_caller_leaves_is_returned() -> None:
    """A finished job wins over a disconnect seen at the same time: it is paid for."""

    async def ready() -> str:
        return "result"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    request._body = b"{}"  # as Starlette caches a body already read
    job = asyncio.ensure_future(ready())
    await job
    assert await d.cancel_on_disconnect(request, job) == "result"


async def test_a_disconnect_cancels_the_work_and_says_so() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async def receive() -> dict[str, Any]:
        await started.wait()
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    job = asyncio.ensure_future(forever())
    with pytest.raises(d.CallerDisconnectedError):
        await d.cancel_on_disconnect(request, job)
    assert job.cancelled()


async def test_an_unknown_request_type_is_refused_without_leaking_the_coroutine() -> None:
    async def work() -> None:  # pragma: no cover - never started
        pass

    with pytest.raises(TypeError, match=r"Starlette/FastAPI Request or an aiohttp\.web request"):
        await d.cancel_on_disconnect(object(), work())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_interval"):
        await d.cancel_on_disconnect(object(), work(), check_interval=0)  # type: ignore[arg-type]


def test_the_module_imports_neither_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, dreamo_async; "
        "print(sorted(m for m in ('starlette', 'fastapi', 'aiohttp.web') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

