"""The hot path's shortcuts keep every guarantee (issue 4's throughput pass)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dreamo_async as d
import dreamo_async._answers as answers_module
import dreamo_async._endpoints as endpoints_module
import dreamo_async.transport as transport_module
import dreamo_async.wire as wire
from dreamo_async.coordination import LocalSlots
from dreamo_async.testing import FakeDreamOServer, Fault, make_png
from dreamo_async.wire import parse_task

KEY = "sk-test-0123456789abcdef"
PNG = make_png(64, 64)
NO_WAIT = d.RetryPolicy(initial_delay=0, max_delay=0)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=0) as fake:
        yield fake


async def test_a_stalled_poll_hits_the_per_request_timeout_and_is_retried(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polls carry a total timeout instead of the session's sock_read: a stall still ends.
    monkeypatch.setattr(transport_module, "_POLL_TIMEOUT", aiohttp.ClientTimeout(total=0.2))
    async with d.DreamOClient(api_key=KEY, base_url=server.url, retry=NO_WAIT) as client:
        task = await client.submit(prompt="p", images=[PNG])
        server.inject("poll", Fault.slow(3000))
        polled = await client.get_task(task.id)
    assert polled.id == task.id
    assert server.stats.polls == 2  # the stalled one, then the retry


async def test_a_user_request_timeout_governs_polls_too(server: FakeDreamOServer) -> None:
    timeout = aiohttp.ClientTimeout(sock_read=0.2)
    retry = d.RetryPolicy(max_attempts=1)
    async with d.DreamOClient(
        api_key=KEY, base_url=server.url, request_timeout=timeout, retry=retry
    ) as client:
        task = await client.submit(prompt="p", images=[PNG])
        server.inject("poll", Fault.slow(3000))
        with pytest.raises(d.APIConnectionError):
            await client.get_task(task.id)
    assert server.stats.polls == 1


async def test_a_small_create_that_stalls_after_sending_is_outcome_unknown(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small creates carry one total deadline (no sock_read timer re-armed per read).
    monkeypatch.setattr(
        transport_module, "_CREATE_TIMEOUT", aiohttp.ClientTimeout(total=0.3, connect=0.2)
    )
    async with d.DreamOClient(api_key=KEY, base_url=server.url, retry=NO_WAIT) as client:
        server.inject("create", Fault.slow(3000))
        with pytest.raises(d.CreateOutcomeUnknownError):
            await client.submit(prompt="p", images=[PNG])
    assert server.stats.create_requests == 1  # sent once, never again


async def test_a_create_waiting_past_its_connect_deadline_for_a_pooled_connection_is_retried(
    server: FakeDreamOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wait for a free pooled connection counts against ``connect``, not ``total``:
    # a create that timed out there was surely never sent, so it is sent again.
    monkeypatch.setattr(
        transport_module, "_CREATE_TIMEOUT", aiohttp.ClientTimeout(total=5.0, connect=0.15)
    )
    retry = d.RetryPolicy(max_attempts=20, initial_delay=0, max_delay=0)
    async with d.DreamOClient(
        api_key=KEY, base_url=server.url, retry=retry, max_connections=1, max_concurrency=2
    ) as client:
        task = await client.submit(prompt="p", images=[PNG])
        server.inject("poll", Fault.slow(700))
        holder = asyncio.create_task(client.get_task(task.id))  # holds the one connection
        await asyncio.sleep(0.1)
        created = await client.submit(prompt="q", images=[PNG])
        await holder
    assert created.id != task.id
    assert server.stats.create_requests == 2  # one per submit: the timed-out waits sent nothing


async def test_the_free_slot_shortcut_never_jumps_the_queue() -> None:
    slots = LocalSlots(1)
    assert slots.try_acquire()
    assert not slots.try_acquire()  # taken
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    assert slots.waiting == 1
    slots.release_nowait()  # the slot is the waiter's now
    assert not slots.try_acquire()  # FIFO: the queued waiter goes first
    await waiter
    assert slots.in_use == 1
    slots.release_nowait()
    assert slots.in_use == 0


async def test_generate_after_a_429_waits_for_the_cool_down(server: FakeDreamOServer) -> None:
    # Before any 429 the unlimited limiter is skipped; its first 429 pauses every request.
    server.inject("create", Fault.status(429, retry_after="0.3"))
    loop = asyncio.get_running_loop()
    async with d.DreamOClient(api_key=KEY, base_url=server.url, retry=NO_WAIT) as client:
        started = loop.time()
        result = await client.generate(prompt="p", images=[PNG])
        assert loop.time() - started >= 0.29  # the retry waited out the hint
        # The 429 also ended the unlimited fast path: the client now learns its rate.
        assert isinstance(client._transport.limiter, d.AdaptiveLimiter)
    assert result.image_urls
    assert server.stats.creates == 1  # the 429 made no task; the retry made one


def test_cached_usage_keeps_int_and_float_costs_apart() -> None:
    as_int = parse_task({"id": "t", "status": "completed", "usage": {"cost": 1, "discount": 1}})
    as_float = parse_task({"id": "t", "status": "completed", "usage": {"cost": 1.0}})
    assert as_int.usage is not None
    assert str(as_int.usage.cost) == "1"
    assert as_float.usage is not None
    assert str(as_float.usage.cost) == "1.0"
    assert parse_task({"id": "t", "status": "done", "usage": {"cost": True}}).usage == d.Usage()


def test_fast_field_paths_match_the_tolerant_ones() -> None:
    with pytest.raises(d.ResponseFormatError):
        parse_task({"id": None, "task_id": "x"})  # an explicit null id is no id
    odd = parse_task({"id": "t", "status": " Completed ", "created_at": True, "output": "u"})
    assert odd.status is d.TaskStatus.COMPLETED
    assert odd.created_at is None
    assert [image.url for image in odd.images] == ["u"]


@pytest.mark.parametrize(
    ("base_url", "task_path", "task_id", "expected"),
    [
        (
            "http://h:1",
            "/model/v1/generation/task/{id}",
            "fake12",
            "http://h:1/model/v1/generation/task/fake12",
        ),
        (
            "http://h:1",
            "/model/v1/generation/task/{id}",
            "a/b c?",
            "http://h:1/model/v1/generation/task/a%2Fb%20c%3F",
        ),
        (
            "http://h:1",
            "/model/v1/generation/task/{id}",
            "ü",
            "http://h:1/model/v1/generation/task/%C3%BC",
        ),
        (
            "https://p.example/vtrix/",
            "/t/{id}/status",
            "x-1",
            "https://p.example/vtrix/t/x-1/status",
        ),
        ("http://h", "/q?id={id}", "a b", "http://h/q?id=a%20b"),  # a query: formatted as text
        ("http://h", "/x/{id:>4}", "ab", "http://h/x/  ab"),  # a format spec: idem
    ],
)
def test_poll_urls_built_from_parts_match_the_template(
    base_url: str, task_path: str, task_id: str, expected: str
) -> None:
    endpoints = transport_module.Endpoints(base_url=base_url, task_path=task_path)
    assert str(endpoints_module.task_url_maker(endpoints)(task_id)) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id":"t1","status":"completed"}',
        b'{"id":"t1"}\r\n',  # a newline after the document
        b' \n{"id":"t1"}',  # whitespace before it: json.loads decides
        '\ufeff{"id":"t1"}'.encode(),  # a UTF-8 BOM
        '{"id":"é"}'.encode("utf-16"),  # another encoding json.loads detects
        '{"id":"猫"}'.encode(),
    ],
)
def test_the_json_fast_path_reads_what_json_loads_reads(payload: bytes) -> None:
    assert answers_module.read_json(payload, 200, None) == json.loads(payload)


@pytest.mark.parametrize(
    "payload",
    [b'{"id":"t1"} trailing', b'{"id":', b"\xff\xfe\xfd", b"[1]", b"null", b"3", b'"t1"'],
)
def test_the_json_fast_path_refuses_what_it_must(payload: bytes) -> None:
    with pytest.raises(d.ResponseFormatError):
        answers_module.read_json(payload, 200, None)


@given(
    st.dictionaries(
        st.text(max_size=12),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
        | st.lists(st.text(max_size=4), max_size=3),
        max_size=6,
    )
)
def test_the_create_head_reads_back_as_the_params_given(
    params: dict[str, object],
) -> None:
    body = b"".join(wire.create_body_parts("spark_multi_dreamo", params))
    assert json.loads(body) == {"model": "spark_multi_dreamo", "input": [{"params": params}]}


def test_the_create_head_refuses_what_json_cannot_carry() -> None:
    for bad in ({"x": float("nan")}, {"x": object()}):
        with pytest.raises((ValueError, TypeError)):
            wire.create_body_parts("m", bad)


@given(
    st.dictionaries(
        st.text(max_size=12),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
        | st.lists(st.text(max_size=4) | st.integers(), max_size=3)
        | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        max_size=6,
    )
)
def test_the_hand_written_head_is_the_json_encoders_text(params: dict[str, object]) -> None:
    from dreamo_async._fastpath import HEAD_ENCODER, encode_head

    expected = HEAD_ENCODER.encode({"model": "spark_multi_dreamo", "input": [{"params": params}]})
    assert encode_head("spark_multi_dreamo", params) == expected
