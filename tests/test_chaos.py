"""Chaos: hundreds of jobs against a service that does every wrong thing at once.

The run is seeded and sized for ``make test`` (a few seconds); ``make fuzz`` runs
it at length (``fuzz/chaos.py``). ``pytest -s`` prints the table.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import attrs
import pytest

import dreamo_async as d
from dreamo_async.testing import ChaosConfig, FakeDreamOServer, Fault, make_png, run_chaos
from dreamo_async.testing.harness import ChaosReport

from .conftest import eventually

#: Every way a job may end. Anything else (a bare aiohttp or asyncio exception, a
#: KeyError from a parser...) escapes run_chaos and fails the test.
ALLOWED_OUTCOMES = {
    "GenerationResult",
    "CreateOutcomeUnknownError",
    "TaskTimeoutError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "ResponseFormatError",
    "APIConnectionError",
}
#: Every fault the chaos configuration injects, as counted by the server.
EVERY_FAULT = {
    "create:drop_before_body",
    "create:drop_after_body",
    "create:reset_mid_response",
    "create:html_502",
    "create:html_503",
    "create:invalid_json",
    "create:wrong_shape",
    "create:slow",
    "create:slow_answer",
    "create:create_then_5xx",
    "create:unexpected_202",
    "create:unexpected_203",
    "create:unexpected_204",
    "create:rate_limit_storm",
    "poll:drop_before_body",
    "poll:drop_after_body",
    "poll:reset_mid_response",
    "poll:html_502",
    "poll:html_503",
    "poll:invalid_json",
    "poll:wrong_shape",
    "poll:slow",
    "poll:slow_answer",
    "poll:rate_limit_storm",
    "task:never_finish",
    "task:vanish",
}
PNG = make_png(64, 64)


@pytest.mark.slow
async def test_500_jobs_under_every_fault_at_once_end_typed_and_nothing_is_lost() -> None:
    report = await run_chaos(500, config=ChaosConfig.everything(0.03, seed=7, slow_ms=200))
    print("\n" + report.table())

    # every fault of the issue struck; the few storms without hints fall on creates, on
    # polls or (under load) on neither, as the timing goes: test_429_storms_without_hints...
    # is the test that they strike and are survived
    hintless = {"create:hintless_storm", "poll:hintless_storm"}
    assert EVERY_FAULT <= set(report.faults) <= EVERY_FAULT | hintless
    assert report.faults_injected > 300
    assert sum(report.outcomes.values()) == 500
    assert report.lost == 0
    assert set(report.outcomes) <= ALLOWED_OUTCOMES
    # More faults strike than before issue 13 (unexpected 2xx, slow answers, storms without
    # hints, each pausing the client): fewer clean results; the money invariants below hold.
    assert report.outcomes["GenerationResult"] > 150
    # each error kind the faults must produce did occur
    assert {"CreateOutcomeUnknownError", "TaskTimeoutError", "NotFoundError"} <= set(
        report.outcomes
    )
    # errors raised after the task existed say which task
    for name in ("TaskTimeoutError", "NotFoundError"):
        assert report.errors_with_task_id[name] == report.outcomes[name]
    # never paid twice, and every paid task is known to the client
    assert report.max_creates_per_request_id == 1
    assert report.max_creates_per_prompt == 1
    assert report.unaccounted_tasks == 0
    # nothing left behind
    assert report.tasks_after == report.tasks_before
    if report.fds_before >= 0:
        assert report.fds_after == report.fds_before
    # Traced memory is back where it was after an equal run without faults (the
    # fake server's own tasks forgotten): a leak of 128 bytes per job would show.
    assert report.memory_growth < 64 * 1024
    # the same invariants as fuzz/chaos.py checks at scale, through the report's own list
    assert report.problems() == []


async def test_chaos_is_reproducible_from_its_seed() -> None:
    # One job at a time and tasks that end at once: the same requests in the same order.
    config = attrs.evolve(
        ChaosConfig.everything(0.05, seed=3), slow=0.0, never_finish=0.0, vanish_after_ms=0
    )
    runs = [
        await run_chaos(
            60, config=config, concurrency=1, task_duration_ms=0, trace_memory=False
        )
        for _ in range(2)
    ]
    assert runs[0].faults == runs[1].faults
    assert runs[0].outcomes == runs[1].outcomes
    assert runs[0].faults_injected > 10


async def test_the_memory_figure_sees_a_client_that_keeps_a_kibibyte_per_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The growth the 500-job test bounds is the client's: a client keeping 1 KiB per job
    # shows as about that much, one that keeps nothing as almost nothing (300 jobs: the
    # bounded URL caches of yarl and the endpoints, 256 entries, are full after the warm-up).
    kept: list[bytes] = []
    generate = d.DreamOClient.generate

    async def generate_and_keep(self: d.DreamOClient, *args: Any, **kwargs: Any) -> Any:
        kept.append(bytes(1024))
        return await generate(self, *args, **kwargs)

    clean = await run_chaos(300, config=ChaosConfig(), task_duration_ms=0)
    monkeypatch.setattr(d.DreamOClient, "generate", generate_and_keep)
    leaky = await run_chaos(300, config=ChaosConfig(), task_duration_ms=0)
    assert clean.memory_growth < 32 * 1024  # 2-19 KiB seen (aiohttp pools, caches)
    assert leaky.memory_growth > 290 * 1024  # 300 KiB kept during the run


def test_chaos_config_refuses_impossible_probabilities() -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        ChaosConfig(slow=1.5)
    with pytest.raises(ValueError, match=r"sum to <= 1"):
        ChaosConfig(html_5xx=0.6, invalid_json=0.6)
    with pytest.raises(ValueError, match="never_finish"):
        ChaosConfig(never_finish=0.7, vanish=0.7)
    with pytest.raises(ValueError, match="unknown endpoint"):
        ChaosConfig(endpoints=("upload",))  # type: ignore[arg-type]


# --------------------------------------------------------------------- each fault alone


async def _client(server: FakeDreamOServer, **options: object) -> d.DreamOClient:
    settings: dict[str, object] = {
        "retry": d.RetryPolicy(max_attempts=2, initial_delay=0, max_delay=0),
        "poll": d.PollPolicy(initial_delay=0.001, max_delay=0.005, timeout=0.3),
        **options,
    }
    return d.DreamOClient(api_key="test-key", base_url=server.url, **settings)  # type: ignore[arg-type]


async def test_reset_mid_response_sends_half_a_body_then_resets(
    dreamo_server: FakeDreamOServer,
) -> None:
    dreamo_server.inject("create", Fault.reset_mid())
    async with await _client(dreamo_server) as client:
        with pytest.raises(d.CreateOutcomeUnknownError) as info:
            await client.submit(prompt="p", images=[PNG])
    assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError | aiohttp.ClientOSError)
    assert dreamo_server.stats.creates == 1  # the task exists: never re-sent
    assert dreamo_server.stats.create_requests == 1


async def test_a_vanishing_task_ends_as_not_found_with_its_task_id(
    dreamo_server_factory: object,
) -> None:
    server = await dreamo_server_factory(  # type: ignore[operator]
        task_duration_ms=200, chaos_config=ChaosConfig(vanish=1.0, vanish_after_ms=1)
    )
    async with await _client(server) as client:
        with pytest.raises(d.NotFoundError) as info:
            await client.generate(prompt="p", images=[PNG])
    (task_id,) = server.tasks
    assert info.value.task_id == task_id
    assert task_id in str(info.value)
    assert server.stats.faults == {"task:vanish": 1}


async def test_a_task_that_never_finishes_times_out_with_its_task_id(
    dreamo_server_factory: object,
) -> None:
    server = await dreamo_server_factory(  # type: ignore[operator]
        chaos_config=ChaosConfig(never_finish=1.0)
    )
    async with await _client(server) as client:
        with pytest.raises(d.TaskTimeoutError) as info:
            await client.generate(prompt="p", images=[PNG], timeout=0.05)
    assert info.value.task_id in server.tasks


async def test_a_429_storm_answers_storm_length_requests_then_stops(
    dreamo_server_factory: object,
) -> None:
    server = await dreamo_server_factory(  # type: ignore[operator]
        chaos_config=ChaosConfig(rate_limit_storm=1.0, storm_length=3, retry_after_s=0.001)
    )
    retry = d.RetryPolicy(max_attempts=4, initial_delay=0, max_delay=0)
    async with await _client(server, retry=retry) as client:
        with pytest.raises(d.RateLimitError) as info:
            await client.submit(prompt="p", images=[PNG])
    assert info.value.retry_after == pytest.approx(0.001)
    assert server.stats.faults == {"create:rate_limit_storm": 4}
    assert server.stats.creates == 0  # a 429 makes nothing
    server.set_chaos(None)
    async with await _client(server) as client:
        await client.submit(prompt="p", images=[PNG])
    assert server.stats.creates == 1


async def test_an_html_502_on_a_poll_is_retried_and_a_create_5xx_is_never_resent(
    dreamo_server_factory: object,
) -> None:
    server = await dreamo_server_factory(  # type: ignore[operator]
        chaos_config=ChaosConfig(html_5xx=1.0, endpoints=("poll",))
    )
    async with await _client(server) as client:
        task = await client.submit(prompt="p", images=[PNG])
        with pytest.raises(d.ServerError, match=r"non-JSON body \(text/html") as info:
            await client.wait(task.id)
    assert info.value.task_id == task.id
    assert server.stats.polls == 2  # retried once (max_attempts=2), then raised
    server.set_chaos(ChaosConfig(create_then_5xx=1.0))
    async with await _client(server) as client:
        with pytest.raises(d.CreateOutcomeUnknownError):
            await client.submit(prompt="q", images=[PNG])
    assert server.stats.creates_by_prompt["q"] == 1
    assert server.stats.create_requests == 2


# --------------------------------------------------------------------- the money faults


async def test_429_storms_without_hints_lose_no_job_and_pay_nothing_twice() -> None:
    config = ChaosConfig(seed=5, hintless_storm=0.02, storm_length=10)
    report = await run_chaos(150, config=config, trace_memory=False)
    print("\n" + report.table())
    assert {"create:hintless_storm", "poll:hintless_storm"} <= set(report.faults)
    assert report.problems() == []


async def test_a_slow_answer_is_sent_after_the_task_is_made(
    dreamo_server: FakeDreamOServer,
) -> None:
    dreamo_server.inject("create", Fault.slow_answer(300))
    async with await _client(dreamo_server) as client:
        submit = asyncio.create_task(client.submit(prompt="p", images=[PNG]))
        await eventually(lambda: dreamo_server.stats.creates == 1)
        assert not submit.done()  # the task exists; its answer is still 300 ms away
        task = await submit
    assert task.id in dreamo_server.tasks


async def test_an_unexpected_2xx_fault_makes_the_task_then_answers_empty(
    dreamo_server_factory: object,
) -> None:
    server = await dreamo_server_factory(  # type: ignore[operator]
        chaos_config=ChaosConfig(unexpected_2xx=1.0, endpoints=("create",), seed=1)
    )
    async with await _client(server) as client:
        for _ in range(12):
            with contextlib.suppress(d.DreamOError):  # how the client reads it is not tested here
                await client.submit(prompt="p", images=[PNG])
    assert server.stats.creates == server.stats.create_requests  # each one made its task
    assert set(server.stats.status_codes) == {202, 203, 204}
    assert set(server.stats.faults) == {
        "create:unexpected_202",
        "create:unexpected_203",
        "create:unexpected_204",
    }


def test_a_request_the_limiter_never_saw_is_a_problem_of_the_run() -> None:
    base: dict[str, Any] = {
        "jobs": 1, "outcomes": {"GenerationResult": 1}, "errors_with_task_id": {},
        "faults": {}, "tasks_created": 1, "unaccounted_tasks": 0,
        "max_creates_per_request_id": 1, "max_creates_per_prompt": 1, "create_requests": 1,
        "polls": 1, "seconds": 1.0, "memory_growth": 0, "tasks_before": 1, "tasks_after": 1,
        "fds_before": 3, "fds_after": 3,
    }  # fmt: skip
    assert ChaosReport(**base, max_requests_per_second=9, rate_budget=None).problems() == []
    assert ChaosReport(**base, max_requests_per_second=9, rate_budget=9).problems() == []
    (problem,) = ChaosReport(**base, max_requests_per_second=10, rate_budget=9).problems()
    assert "10 requests in one second" in problem


# ------------------------------------------- waiting on the transport and client fixes


@pytest.mark.slow
async def test_a_client_closed_while_slow_creates_are_in_flight_leaves_no_task_unaccounted() -> (
    None
):
    """aclose() while 50 creates wait for their answers: each task the service made is
    named by its job's error (the request id of an unknown outcome). Needs the client to
    raise CreateOutcomeUnknownError, with the request id, for a create closed mid-flight."""
    config = ChaosConfig(seed=5, slow_answer=0.5, slow_ms=1000, endpoints=("create",))
    report = await run_chaos(
        150, config=config, close_after=0.3, read_timeout=3.0, job_timeout=5.0,
        trace_memory=False,
    )  # fmt: skip
    print("\n" + report.table())
    assert report.faults["create:slow_answer"] > 20
    assert report.lost == 0
    assert report.problems() == []


async def test_unexpected_2xx_create_answers_leave_no_task_unaccounted() -> None:
    """202/203/204 with an empty body after the task was made: outcome unknown, never a
    refusal. Needs the transport's status handling (issue 13, case 2)."""
    config = ChaosConfig(seed=5, unexpected_2xx=0.2, endpoints=("create",))
    report = await run_chaos(150, config=config, trace_memory=False)
    print("\n" + report.table())
    assert {"create:unexpected_202", "create:unexpected_203", "create:unexpected_204"} <= set(
        report.faults
    )
    assert report.problems() == []


@pytest.mark.slow
async def test_dropped_polls_are_never_re_sent_behind_the_limiters_back() -> None:
    """Every request that reaches the service took a rate slot, dropped polls included.
    Needs the transport to stop aiohttp's silent re-send of a GET (issue 13, case 6)."""
    config = ChaosConfig(seed=5, drop_before_body=0.3, endpoints=("poll",))
    report = await run_chaos(
        100, config=config, requests_per_second=100, job_timeout=10.0, trace_memory=False
    )
    print("\n" + report.table())
    assert report.faults["poll:drop_before_body"] > 20
    assert report.problems() == []
