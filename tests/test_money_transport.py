"""Issue 13, the transport's part: what a create's answer proves, requests the limiter
never saw, deadlines that hold, paid jobs that survive transient faults. Over real HTTP."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, Fault, make_png

KEY = "sk-test-0123456789abcdef"
PNG = make_png(64, 64)
FAST_POLL = d.PollPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.0, timeout=10)
FAST_RETRY = d.RetryPolicy(initial_delay=0.01, max_delay=0.02, rate_limit_pause=0.05)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=40) as fake:
        yield fake


def client_for(server: FakeDreamOServer | str, **options: Any) -> d.DreamOClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", FAST_RETRY)
    url = server if isinstance(server, str) else server.url
    return d.DreamOClient(api_key=KEY, base_url=url, **options)


# -- case 2: what a create's answer proves -------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault.create_then_500(204, body=""),
        Fault.create_then_500(202, body=""),
        Fault.create_then_500(203),  # a JSON error body, but a 2xx: not a refusal
        Fault.create_then_500(404),
        Fault.create_then_500(405, body="<html>405</html>", content_type="text/html"),
        Fault.create_then_500(413),
        Fault.create_then_500(400, body="<html>bad request</html>", content_type="text/html"),
    ],
    ids=["204-empty", "202-empty", "203-json-error", "404", "405-html", "413", "400-no-code"],
)
async def test_an_undocumented_create_answer_leaves_the_outcome_unknown(
    server: FakeDreamOServer, fault: Fault
) -> None:
    server.inject("create", fault)
    async with client_for(server) as client:
        with pytest.raises(d.CreateOutcomeUnknownError) as caught:
            await client.submit(images=[PNG], prompt="a cat")
    error = caught.value
    assert error.money_state is d.MoneyState.OUTCOME_UNKNOWN
    assert error.unknown_task_possible
    assert not error.nothing_sent
    assert error.request_id
    assert server.stats.create_requests == 1  # never re-sent
    assert server.stats.creates == 1  # ...and the service did make a task


async def test_an_unexpected_2xx_with_a_task_in_its_body_is_the_task(
    server: FakeDreamOServer,
) -> None:
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=20, create_status=201) as fake,
        client_for(fake) as client,
    ):
        task = await client.submit(images=[PNG], prompt="a cat")
    assert task.id
    # 202 with the task: parsed, not refused
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=20, create_status=202) as fake,
        client_for(fake) as client,
    ):
        result = await client.generate(images=[PNG], prompt="a cat")
    assert result.task_id
    assert fake.stats.creates == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_a_documented_refusal_means_nothing_was_created(
    server: FakeDreamOServer, status: int
) -> None:
    server.inject("create", Fault.status(status))
    async with client_for(server) as client:
        with pytest.raises(d.APIError) as caught:
            await client.submit(images=[PNG], prompt="a cat")
    assert caught.value.nothing_sent
    assert server.stats.creates == 0


async def test_a_400_with_the_providers_code_is_a_refusal(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.status(400, code="003013004", message="invalid parameter"))
    async with client_for(server) as client:
        with pytest.raises(d.APIError) as caught:
            await client.submit(images=[PNG], prompt="a cat")
    assert not isinstance(caught.value, d.CreateOutcomeUnknownError)
    assert caught.value.nothing_sent
    assert caught.value.code == "003013004"


# -- case 4: odd but parseable answers -----------------------------------------------------


async def test_an_odd_field_in_the_create_answer_leaves_the_outcome_unknown(
    server: FakeDreamOServer,
) -> None:
    odd = {"id": "t-odd", "status": "pending", "created_at": "²"}
    server.inject("create", Fault.wrong_shape(odd))
    async with client_for(server) as client:
        with pytest.raises(d.CreateOutcomeUnknownError) as caught:
            await client.submit(images=[PNG], prompt="a cat")
    assert caught.value.money_state is d.MoneyState.OUTCOME_UNKNOWN
    assert server.stats.create_requests == 1


async def test_an_odd_field_in_a_poll_answer_is_read_again_then_a_format_error(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server) as client:
        task = await client.submit(images=[PNG], prompt="a cat [slow:200]")
        odd = {"id": task.id, "status": "processing", "created_at": "²"}
        server.inject("poll", Fault.wrong_shape(odd))
        result = await client.wait(task)  # one odd answer: read again
        assert result.task_id == task.id
        server.inject("poll", Fault.wrong_shape(odd), times=20)
        with pytest.raises(d.ResponseFormatError) as caught:
            await client.get_task(task.id)
    assert caught.value.task_id == task.id


# -- case 6: requests the limiter never saw ------------------------------------------------


async def test_a_dropped_poll_is_retried_through_the_limiter(server: FakeDreamOServer) -> None:
    # Every third poll's connection is dropped; aiohttp alone would re-send it at once.
    for _ in range(30):
        server.inject("poll", Fault.slow(0))
        server.inject("poll", Fault.slow(0))
        server.inject("poll", Fault.drop_before())
    async with client_for(
        server,
        requests_per_second=5,
        burst=1,
        max_concurrency=4,
        poll=d.PollPolicy(initial_delay=0.05, max_delay=0.05, jitter=0.0, timeout=20),
    ) as client:
        await asyncio.gather(
            *(client.generate(images=[PNG], prompt=f"a cat {i} [slow:1500]") for i in range(4))
        )
    assert server.stats.faults["poll:drop_before"] >= 2
    assert server.stats.max_requests_in_window(1.0) <= 5 + 1


async def _redirector(target: str) -> tuple[web.AppRunner, str]:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target + request.path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_api_calls_never_follow_a_redirect(server: FakeDreamOServer) -> None:
    runner, url = await _redirector(server.url)
    try:
        async with client_for(url) as client:
            with pytest.raises(d.CreateOutcomeUnknownError, match="redirected to"):
                await client.submit(images=[PNG], prompt="a cat")
            with pytest.raises(d.APIError, match=server.url):
                await client.get_task("t1")
    finally:
        await runner.cleanup()
    assert server.stats.requests == 0  # nothing reached the service behind the redirect


# -- case 7: hooks before the slot ---------------------------------------------------------


async def test_before_send_hooks_run_before_the_rate_slot(server: FakeDreamOServer) -> None:
    calls = 0

    async def slow_journal(request_id: str) -> None:
        # The first hook is the slowest: with slots taken first, all leave at ~0.8 s.
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2 * (5 - calls))

    async with client_for(server, requests_per_second=5, burst=1, max_concurrency=5) as client:
        await asyncio.gather(
            *(
                client.submit(images=[PNG], prompt=f"a cat {i}", before_send=slow_journal)
                for i in range(5)
            )
        )
    assert server.stats.max_requests_in_window(0.5) <= 3


# -- case 10: deadlines hold ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", [Fault.slow(3000), Fault.drop_before()], ids=["slow-polls", "dropped-polls"]
)
async def test_the_deadline_holds_whatever_the_polls_do(
    server: FakeDreamOServer, fault: Fault
) -> None:
    retry = d.RetryPolicy(initial_delay=1.0, max_delay=2.0)
    async with client_for(server, retry=retry) as client:
        server.inject("poll", fault, times=50)
        started = time.monotonic()
        with pytest.raises(d.TaskTimeoutError) as caught:
            await client.generate(images=[PNG], prompt="a cat [never]", timeout=0.5)
        elapsed = time.monotonic() - started
    assert caught.value.task_id
    assert caught.value.timeout == 0.5
    assert elapsed < 0.5 + 0.3  # the deadline, not 3 to 8 s of retries


# -- case 11: 429 and transient faults never end a paid job --------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(429, retry_after=0.01),
        Fault.status(429),
        Fault.status(502, body="<html>502</html>", content_type="text/html"),
        Fault.drop_before(),
    ],
    ids=["429-hint", "429-no-hint", "502-html", "dropped"],
)
async def test_transient_poll_failures_never_end_a_paid_job(
    server: FakeDreamOServer, fault: Fault
) -> None:
    server.inject("poll", fault, times=12)  # more than max_attempts
    async with client_for(
        server,
        retry=d.RetryPolicy(
            max_attempts=3, initial_delay=0.005, max_delay=0.01, rate_limit_pause=0.01
        ),
    ) as client:
        result = await client.generate(images=[PNG], prompt="a cat")
    assert result.task_id
    assert server.stats.creates == 1


async def test_a_429_without_a_hint_pauses_every_request(server: FakeDreamOServer) -> None:
    server.inject("poll", Fault.status(429))
    retry = d.RetryPolicy(initial_delay=0.01, max_delay=0.02, rate_limit_pause=0.3)
    async with client_for(server, retry=retry, max_concurrency=3) as client:
        await asyncio.gather(
            *(client.generate(images=[PNG], prompt=f"a cat {i} [slow:100]") for i in range(3))
        )
    times = [t for t, _, path in server.stats.request_times if path.startswith("/model/")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) >= 0.25  # nobody polled during the cool-down


async def test_the_default_client_learns_the_rate_from_the_first_429() -> None:
    async with (
        FakeDreamOServer(
            api_key=KEY,
            task_duration_ms=50,
            rate_limit=20,
            rate_counts_rejected=True,
            rate_retry_after_ms=200,
        ) as fake,
        client_for(
            fake,
            max_concurrency=30,
            retry=d.RetryPolicy(),
            poll=d.PollPolicy(initial_delay=0.2, max_delay=0.5, timeout=60),
        ) as client,
    ):
        results = await asyncio.gather(
            *(client.generate(images=[PNG], prompt=f"a cat {i}") for i in range(60)),
            return_exceptions=True,
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert fake.stats.creates == 60


# -- case 15: the key ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sk-abc\r\nX-Evil: 1", "sk-abc\n", "sk\0abc"])
def test_a_key_with_a_line_break_is_refused_at_construction(key: str) -> None:
    with pytest.raises(d.ConfigurationError, match="line break"):
        d.DreamOClient(api_key=key)


async def test_a_key_echoed_in_an_error_code_is_redacted(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.status(401, code=f"bad key {KEY}", message="invalid key"))
    async with client_for(server) as client:
        with pytest.raises(d.AuthenticationError) as caught:
            await client.submit(images=[PNG], prompt="a cat")
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value.__dict__)
    assert "<redacted>" in (caught.value.code or "")
