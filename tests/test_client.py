"""The client end to end, over real HTTP against FakeDreamOServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, Fault, make_jpeg, make_png

from .conftest import eventually

KEY = "sk-test-0123456789abcdef"
FAST_POLL = d.PollPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.0, timeout=10)
PNG = make_png(64, 64)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=40) as fake:
        yield fake


def client_for(server: FakeDreamOServer, **options: Any) -> d.DreamOClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", d.RetryPolicy(initial_delay=0.01, max_delay=0.02))
    return d.DreamOClient(api_key=options.pop("api_key", KEY), base_url=server.url, **options)


async def test_generate_end_to_end_with_every_local_source_kind(
    server: FakeDreamOServer, tmp_path: Path
) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG)
    async with client_for(server) as client:
        result = await client.generate(
            prompt="a cat",
            images=[path, path, PNG],
            ref_types=["IP", d.RefType.ID, "style"],
            seed=7,
            width=1328,
            height=1328,
        )
    assert result.task_id
    assert result.image_urls
    assert result.image_urls[0].startswith(server.url)
    assert result.cost == Decimal("0.03")
    assert server.stats.creates == 1
    body = server.last_create_body
    assert body is not None
    params = body["input"][0]["params"]
    assert body["model"] == "spark_multi_dreamo"
    assert len(params["binary_data_base64"]) == 3
    assert params["ref_type_list"] == ["IP", "ID", "STYLE"]
    assert params["seed"] == 7
    assert "image_urls" not in params


async def test_urls_only_are_sent_as_image_urls(server: FakeDreamOServer) -> None:
    url = server.add_file("/assets/ref.png", PNG, "image/png")
    async with client_for(server) as client:
        await client.generate(prompt="p", images=[url])
    assert server.last_create_body is not None
    assert server.last_create_body["input"][0]["params"]["image_urls"] == [url]
    assert server.stats.downloads == 0  # the client did not fetch it


async def test_an_aspect_warning_points_at_the_generate_call(server: FakeDreamOServer) -> None:
    # On the loop (small bytes) or via the worker thread (a file object) alike.
    tall = make_png(100, 400)
    async with client_for(server, limits=d.Limits(aspect_policy="warn")) as client:
        for image in (tall, io.BytesIO(tall)):
            line = sys._getframe().f_lineno + 2  # the call's line
            with pytest.warns(d.DreamOWarning) as caught:
                await client.generate(prompt="p", images=[image])
            assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


async def test_a_request_object_and_keywords_are_equivalent(server: FakeDreamOServer) -> None:
    request = d.GenerationRequest(prompt="p", images=[PNG], ddim_steps=20)
    async with client_for(server) as client:
        first = await client.generate(request)
        second = await client.generate(request, seed=3)
    assert first.task_id != second.task_id
    assert server.last_create_body is not None
    assert server.last_create_body["input"][0]["params"]["seed"] == 3


async def test_submit_get_task_and_wait(server: FakeDreamOServer) -> None:
    async with client_for(server) as client:
        task = await client.submit(prompt="p", images=[PNG])
        assert task.status is d.TaskStatus.PENDING
        polled = await client.get_task(task.id)
        assert polled.id == task.id
        result = await client.wait(task.id)
    assert result.task_id == task.id
    assert server.stats.creates == 1


async def test_construction_outside_a_loop_and_key_from_the_environment(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DREAMO_API_KEY", raising=False)
    monkeypatch.setenv("VTRIX_API_KEY", KEY)
    client = await asyncio.to_thread(lambda: d.DreamOClient(base_url=server.url, poll=FAST_POLL))
    async with client:
        await client.generate(prompt="p", images=[PNG])
    monkeypatch.setenv("DREAMO_API_KEY", "wins-over-vtrix")
    async with d.DreamOClient(base_url=server.url) as other:
        with pytest.raises(d.AuthenticationError):
            await other.get_task("x")


async def test_missing_key_is_a_clear_error_at_the_first_request(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DREAMO_API_KEY", raising=False)
    monkeypatch.delenv("VTRIX_API_KEY", raising=False)
    async with d.DreamOClient(base_url=server.url) as client:
        with pytest.raises(d.ConfigurationError, match="DREAMO_API_KEY"):
            await client.generate(prompt="p", images=[PNG])
    assert server.stats.creates == 0


# ------------------------------------------------------------------ error classes


async def test_401_is_authentication_error(server: FakeDreamOServer) -> None:
    async with client_for(server, api_key="wrong-key-123456") as client:
        with pytest.raises(d.AuthenticationError) as info:
            await client.generate(prompt="p", images=[PNG])
    assert info.value.status == 401
    assert server.stats.creates == 0


async def test_403_is_permission_denied(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.status(403, message="insufficient balance"))
    async with client_for(server) as client:
        with pytest.raises(d.PermissionDeniedError, match="insufficient balance"):
            await client.generate(prompt="p", images=[PNG])


async def test_404_is_not_found(server: FakeDreamOServer) -> None:
    async with client_for(server) as client:
        with pytest.raises(d.NotFoundError):
            await client.get_task("no-such-task")


async def test_429_on_create_is_retried_after_retry_after_and_creates_once(
    server: FakeDreamOServer,
) -> None:
    server.inject("create", Fault.status(429, retry_after="0.05"), times=2)
    async with client_for(server) as client:
        started = time.monotonic()
        await client.generate(prompt="p", images=[PNG])
    assert time.monotonic() - started >= 0.1  # two waits of Retry-After
    assert server.stats.creates == 1
    assert all(n == 1 for n in server.stats.creates_by_request_id.values())


async def test_429_beyond_retries_is_rate_limit_error_with_retry_after(
    server: FakeDreamOServer,
) -> None:
    server.inject("create", Fault.status(429, retry_after="0.01"), times=10)
    async with client_for(server, retry=d.RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(d.RateLimitError) as info:
            await client.generate(prompt="p", images=[PNG])
    assert info.value.retry_after == pytest.approx(0.01)
    assert server.stats.creates == 0


async def test_retry_after_longer_than_the_cap_raises_at_once(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.status(429, retry_after="3600"))
    async with client_for(server) as client:
        with pytest.raises(d.RateLimitError) as info:
            await client.generate(prompt="p", images=[PNG])
    assert info.value.retry_after == 3600


async def test_5xx_and_bad_json_on_poll_are_retried(server: FakeDreamOServer) -> None:
    server.inject("poll", Fault.status(503, body="<html>busy</html>", content_type="text/html"))
    server.inject("poll", Fault.invalid_json())
    async with client_for(server) as client:
        result = await client.generate(prompt="p", images=[PNG])
    assert result.image_urls


async def test_persistent_5xx_on_poll_is_server_error(server: FakeDreamOServer) -> None:
    async with client_for(server, retry=d.RetryPolicy(max_attempts=2, initial_delay=0)) as client:
        task = await client.submit(prompt="p", images=[PNG])
        server.inject(
            "poll",
            Fault.status(502, body="<html>bad gateway</html>", content_type="text/html"),
            times=5,
        )
        with pytest.raises(d.ServerError) as info:
            await client.get_task(task.id)
    assert info.value.status == 502
    assert "non-JSON body (text/html" in str(info.value)


async def test_wrong_shape_on_poll_is_response_format_error(server: FakeDreamOServer) -> None:
    async with client_for(server, retry=d.RetryPolicy(max_attempts=1)) as client:
        task = await client.submit(prompt="p", images=[PNG])
        server.inject("poll", Fault.wrong_shape())
        with pytest.raises(d.ResponseFormatError):
            await client.get_task(task.id)


async def test_connection_refused_is_api_connection_error() -> None:
    async with FakeDreamOServer(api_key=KEY) as fake:
        url = fake.url
    async with d.DreamOClient(
        api_key=KEY, base_url=url, retry=d.RetryPolicy(max_attempts=2, initial_delay=0)
    ) as client:
        with pytest.raises(d.APIConnectionError):
            await client.get_task("t")
        with pytest.raises(d.APIConnectionError):
            await client.generate(prompt="p", images=[PNG])


async def test_failed_task_raises_task_failed_error_with_the_code(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server) as client:
        with pytest.raises(d.TaskFailedError) as info:
            await client.generate(prompt="p [fail:003013095]", images=[PNG])
    assert info.value.code == "003013095"
    assert "internal generation error" in str(info.value)
    assert info.value.task_id


async def test_invalid_request_sends_nothing(server: FakeDreamOServer) -> None:
    async with client_for(server) as client:
        with pytest.raises(d.InvalidRequestError):
            await client.generate(prompt="p", images=[PNG], ddim_steps=99)
        with pytest.raises(d.ImageError):
            await client.generate(prompt="p", images=[b"GIF89a" + b"\0" * 20])
    assert server.stats.request_times == []


# ------------------------------------------------------------------ never pay twice


@pytest.mark.parametrize(
    "fault",
    [Fault.create_then_500(), Fault.drop_after(), Fault.status(500), Fault.status(503)],
    ids=["create-then-500", "drop-after-create", "500", "503"],
)
async def test_ambiguous_create_is_never_resent(server: FakeDreamOServer, fault: Fault) -> None:
    server.inject("create", fault)
    async with client_for(server) as client:
        with pytest.raises(d.CreateOutcomeUnknownError) as info:
            await client.generate(prompt="p", images=[PNG])
    assert info.value.request_id
    create_requests = [t for t in server.stats.request_times if t[1] == "POST"]
    assert len(create_requests) == 1  # sent once, never again
    assert server.stats.creates <= 1


async def test_drop_before_the_answer_is_never_resent(server: FakeDreamOServer) -> None:
    server.inject("create", Fault.drop_before())
    async with client_for(server) as client:
        with pytest.raises(d.CreateOutcomeUnknownError):
            await client.generate(prompt="p", images=[PNG])
    assert len([t for t in server.stats.request_times if t[1] == "POST"]) == 1


# ------------------------------------------------------------------ deadlines and cancellation


# The poll loop arms the deadline's timer only once the deadline is near (_ARM_S): with
# 0.05 s, the job polls without the timer first, then under it.
@pytest.mark.parametrize("arm_s", [None, 0.05])
async def test_timeout_raises_with_task_id_and_wait_resumes(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch, arm_s: float | None
) -> None:
    if arm_s is not None:
        monkeypatch.setattr("dreamo_async._pollloop._ARM_S", arm_s)
    async with client_for(server) as client:
        with pytest.raises(d.TaskTimeoutError) as info:
            await client.generate(prompt="p [slow:400]", images=[PNG], timeout=0.1)
        assert isinstance(info.value, TimeoutError)
        assert info.value.timeout == 0.1
        result = await client.wait(info.value.task_id, timeout=5)
    assert result.task_id == info.value.task_id
    assert server.stats.creates == 1


async def test_a_poll_hanging_past_a_deadline_armed_mid_loop_is_cut_by_its_timer(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dreamo_async._pollloop._ARM_S", 0.3)
    async with client_for(server) as client:
        job = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG], timeout=0.6))
        await eventually(lambda: server.stats.polls >= 1)
        await asyncio.sleep(0.35)  # the deadline is near now: its timer is armed
        server.inject("poll", Fault.slow(10_000))  # the next poll hangs far past it
        with pytest.raises(d.TaskTimeoutError) as info:
            await asyncio.wait_for(job, 5)
        assert info.value.task_id is not None
        assert info.value.timeout == 0.6


async def test_a_cancelled_generate_creates_nothing_more_and_its_task_stays_watched(
    server: FakeDreamOServer,
) -> None:
    async with client_for(server) as client:
        job = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
        await eventually(lambda: server.stats.polls >= 2)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await asyncio.sleep(0.1)  # several poll intervals
        assert server.stats.create_requests == 1  # never a new create
        stats = client.statistics()
        assert (stats.tasks_watched, stats.jobs_running) == (1, 1)  # the task keeps its slot
    polls = server.stats.polls
    await asyncio.sleep(0.1)
    assert server.stats.polls == polls  # aclose stopped the watching


async def test_closing_the_client_ends_running_jobs_with_client_closed_error(
    server: FakeDreamOServer,
) -> None:
    client = client_for(server)
    job = asyncio.create_task(client.generate(prompt="p [never]", images=[PNG]))
    await eventually(lambda: server.stats.polls >= 1)
    await client.aclose()
    with pytest.raises(d.ClientClosedError):
        await job
    with pytest.raises(d.ClientClosedError):
        await client.generate(prompt="p", images=[PNG])


async def test_max_concurrency_bounds_open_tasks_at_the_server(server: FakeDreamOServer) -> None:
    async with client_for(server, max_concurrency=3) as client:
        results = await asyncio.gather(
            *(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(12))
        )
    assert len({r.task_id for r in results}) == 12
    assert server.stats.max_open_tasks <= 3
    assert server.stats.creates == 12


async def test_generate_many_yields_everything_once(server: FakeDreamOServer) -> None:
    requests: Iterator[d.GenerationParams] = (
        {"prompt": "p [fail:003013099]" if i == 3 else f"p{i}", "images": [PNG]} for i in range(8)
    )
    seen: list[d.BatchProgress] = []
    async with client_for(server, max_concurrency=2) as client:
        items = [item async for item in client.generate_many(requests, on_progress=seen.append)]
    assert sorted(item.index for item in items) == list(range(8))
    failed = [item for item in items if not item.ok]
    assert [item.index for item in failed] == [3]
    assert isinstance(failed[0].error, d.TaskFailedError)
    assert seen[-1].done == 8
    assert seen[-1].failed == 1
    assert seen[-1].cost == Decimal("0.21")


# ------------------------------------------------------------------ secrets


async def test_the_key_never_appears_in_repr_errors_or_logs(
    server: FakeDreamOServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.inject("create", Fault.status(500))
    async with client_for(server) as client:
        texts = [repr(client), str(client)]
        for call in (
            client.generate(prompt="p", images=[PNG]),
            client.get_task("missing"),
            client.generate(prompt="p [fail:003013095]", images=[PNG]),
        ):
            with pytest.raises(d.DreamOError) as info:
                await call
            texts += [str(info.value), repr(info.value)]
    texts += [record.getMessage() for record in caplog.records]
    assert texts
    assert not [text for text in texts if KEY in text]
    assert "...cdef" in repr(client)


async def test_full_size_body_is_sent_in_parts_intact(server: FakeDreamOServer) -> None:
    """Five near-limit images: sent as parts (no 31 MB join, no aiohttp ResourceWarning
    for a large bytes body, which filterwarnings=error would turn into a failure) and
    received byte for byte."""
    import base64

    images = [make_jpeg(1600 + i, 1200, padding=4_600_000 + i) for i in range(5)]
    async with client_for(server) as client:
        result = await client.generate(prompt="five big refs", images=images)
    assert result.task_id
    body = server.last_create_body
    assert body is not None
    sent = body["input"][0]["params"]["binary_data_base64"]
    assert [base64.b64decode(text) for text in sent] == images
    assert server.stats.creates == 1


def test_a_request_is_checked_once_against_the_client_s_limits() -> None:
    """Building from a request plus keywords checks once, with the client's limits, and
    the result carries them: handing it on (generate_many -> generate) re-checks nothing."""
    import warnings

    limits = d.Limits(max_ddim_steps=20)
    client = d.DreamOClient(api_key=KEY, limits=limits)
    long_prompt = "x" * 400  # over the recommended length: one DreamOWarning per check
    with pytest.warns(d.DreamOWarning):
        request = d.GenerationRequest(prompt=long_prompt, images=[PNG])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = client.build_request(request, seed=3)
        assert client.build_request(built) is built
    assert len(caught) == 1
    assert built.limits is limits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(d.InvalidRequestError, match="ddim_steps"):
            client.build_request(request, ddim_steps=30)  # the client's limit, not 50
