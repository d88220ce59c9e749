"""The request limiter: window guarantee, priorities, cancellation, cool-down, auto rate.

Pure limiter tests record grant times on the loop clock; the end-to-end ones count
at FakeDreamOServer's side, which is what the service would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

import dreamo_async as d
from dreamo_async.coordination import (
    AdaptiveLimiter,
    LocalCoordinator,
    LocalSlots,
    Priority,
    TokenBucketLimiter,
)
from dreamo_async.testing import FakeDreamOServer, Fault, make_png, max_in_window

from .conftest import eventually
from .helpers import KEY, client_for, task_state

PNG = make_png(32, 32)


async def grant_times(limiter: TokenBucketLimiter, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(loop.time())

    await asyncio.gather(*(one() for _ in range(n)))
    return times


async def test_no_window_exceeds_rate_plus_burst_from_the_first_second() -> None:
    limiter = TokenBucketLimiter(rate=100, burst=5)
    times = await grant_times(limiter, 160)
    assert max_in_window(times) <= 105
    # the first second is not special: a full bucket at start would allow 100 + 100 + 5
    first = [t for t in times if t - times[0] < 1.0]
    assert len(first) <= 105
    assert times[-1] - times[0] >= (160 - 5) / 100 - 0.02  # and no slower than it must
    assert limiter.waiting == 0  # nobody left behind


async def test_burst_lets_that_many_through_at_once_then_spaces_them() -> None:
    limiter = TokenBucketLimiter(rate=20, burst=3)
    times = await grant_times(limiter, 5)
    assert times[2] - times[0] < 0.01
    assert times[3] - times[2] == pytest.approx(0.05, abs=0.02)


async def test_polls_go_ahead_of_creates_fifo_within_a_priority() -> None:
    limiter = TokenBucketLimiter(rate=200, burst=1)
    await limiter.acquire()  # the next slot is 5 ms away: everyone below queues
    order: list[str] = []

    async def take(name: str, priority: Priority) -> None:
        await limiter.acquire(priority)
        order.append(name)

    jobs = [
        asyncio.create_task(take(name, prio))
        for name, prio in [
            ("c1", Priority.CREATE),
            ("c2", Priority.CREATE),
            ("p1", Priority.POLL),
            ("c3", Priority.CREATE),
            ("p2", Priority.POLL),
        ]
    ]
    await asyncio.gather(*jobs)
    assert order == ["p1", "p2", "c1", "c2", "c3"]


async def test_a_cancelled_waiter_uses_no_slot() -> None:
    loop = asyncio.get_running_loop()
    limiter = TokenBucketLimiter(rate=10, burst=1)
    await limiter.acquire()
    doomed = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert limiter.waiting == 0
    started = loop.time()
    await limiter.acquire()  # gets the slot the cancelled one would have had
    assert loop.time() - started < 0.1


async def test_a_slot_granted_then_cancelled_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    limiter = TokenBucketLimiter(rate=10, burst=1)
    await limiter.acquire()
    doomed = asyncio.create_task(limiter.acquire())
    wake = TokenBucketLimiter._wake

    def wake_then_cancel(self: TokenBucketLimiter, loop: asyncio.AbstractEventLoop) -> None:
        wake(self, loop)  # grants the slot...
        doomed.cancel()  # ...and the waiter is cancelled before it resumes

    monkeypatch.setattr(TokenBucketLimiter, "_wake", wake_then_cancel)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    started = loop.time()
    await limiter.acquire()
    assert loop.time() - started < 0.05  # the returned slot, not one 100 ms later


async def test_pause_holds_everyone_then_resumes() -> None:
    loop = asyncio.get_running_loop()
    limiter = TokenBucketLimiter(rate=1000, burst=10)
    limiter.pause(0.15)
    started = loop.time()
    times = await grant_times(limiter, 5)
    assert min(times) - started >= 0.149
    assert max(times) - started < 0.3
    unlimited = d.UnlimitedLimiter()
    unlimited.pause(0.05)
    started = loop.time()
    await unlimited.acquire()
    assert loop.time() - started >= 0.049


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucketLimiter(0)
    with pytest.raises(ValueError, match="burst"):
        TokenBucketLimiter(1, burst=0)
    with pytest.raises(ValueError, match="auto"):
        d.DreamOClient(api_key=KEY, requests_per_second="fast")  # type: ignore[arg-type]


async def test_adaptive_limiter_slow_start_then_aimd(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    clock = [1000.0]
    monkeypatch.setattr(loop, "time", lambda: clock[0])
    limiter = AdaptiveLimiter(initial_rate=2.0)
    limiter.record(200)  # starts the clock

    def second(status: int = 200, busy: bool = True) -> None:
        clock[0] += 1.0
        limiter._busy = busy
        limiter.record(status)

    second()
    second()
    assert limiter.rate == 8.0  # slow start: doubled twice
    second(busy=False)
    assert limiter.rate == 8.0  # an idle second teaches nothing
    limiter.record(429)
    assert limiter.rate == 4.0  # the first 429 halves
    limiter.record(429)
    assert limiter.rate == 4.0  # at most one cut per second
    second()
    assert limiter.rate == 4.0  # that second saw a 429: no increase
    second()
    assert limiter.rate == 4.5  # additive increase after a clean second
    second(429)
    assert limiter.rate == pytest.approx(4.5 * 0.85)  # later 429s: x 0.85
    clock[0] += 0.5
    limiter.record(429)
    assert limiter.rate == pytest.approx(4.5 * 0.85)  # not twice within a second


# ------------------------------------------------------------------ over HTTP


async def test_creates_and_polls_together_stay_within_rate_plus_burst() -> None:
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=30) as server,
        client_for(server, max_concurrency=16, requests_per_second=60, burst=4) as client,
    ):
        await asyncio.gather(*(client.generate(prompt=f"p{i}", images=[PNG]) for i in range(30)))
    assert server.stats.requests >= 60
    assert server.stats.max_requests_in_window(1.0) <= 64
    assert all(n == 1 for n in server.stats.creates_by_request_id.values())


async def test_one_429_pauses_every_request_of_the_client() -> None:
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=400) as server,
        client_for(server, max_concurrency=8) as client,
    ):
        jobs = [
            asyncio.create_task(client.generate(prompt=f"p{i}", images=[PNG])) for i in range(8)
        ]
        await eventually(
            lambda: server.stats.polls >= 16,
            describe=lambda: f"{server.stats.polls} polls, {server.stats.requests} requests, "
            f"jobs: {[task_state(job) for job in jobs]}",
        )
        server.inject("poll", Fault.status(429, retry_after="0.25"))
        await asyncio.gather(*jobs)
    assert server.stats.status_codes[429] == 1
    polls = [t for t, method, _ in server.stats.request_times if method == "GET"]
    # the 429 answered one poll; find it: the first gap of >= 0.2 s between polls
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert max(gaps) >= 0.24  # nobody polled during the Retry-After: one shared cool-down
    assert server.stats.rate_limited == 1


async def test_auto_rate_learns_a_server_limit() -> None:
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=1, rate_limit=15, rate_burst=3) as server,
        client_for(server, max_concurrency=6, requests_per_second="auto") as client,
    ):
        assert isinstance(client._transport.limiter, AdaptiveLimiter)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def worker() -> None:
            while loop.time() - started < 2.6:
                with contextlib.suppress(d.RateLimitError):
                    await client.generate(prompt="p", images=[PNG])

        await asyncio.gather(*(worker() for _ in range(6)))
    begin = server.stats.request_times[0][0]
    late = [t for t, _, path in server.stats.request_times if 1.5 <= t - begin < 2.5]
    assert len(late) >= 0.6 * 15  # it found most of the server's rate
    limited = server.stats.refused["rate_limit"]
    assert limited / server.stats.requests < 0.15


def test_local_limits_makes_each_kind() -> None:
    backend = LocalCoordinator()
    assert isinstance(backend.make_limiter(None, 1), d.UnlimitedLimiter)
    assert isinstance(backend.make_limiter(5, 2), TokenBucketLimiter)
    assert isinstance(backend.make_adaptive_limiter(1), AdaptiveLimiter)


def test_auto_rate_with_a_shared_backend_without_learning_is_refused() -> None:
    """A learned rate is per process; silently using one with a shared backend would
    stop sharing the budget, so the client refuses the combination."""

    class SharedBackend(LocalCoordinator):
        make_adaptive_limiter = None  # type: ignore[assignment]

        def __repr__(self) -> str:
            return "<SharedBackend>"

    with pytest.raises(d.ConfigurationError, match=r'"auto" is learned in one process; <Shared'):
        d.DreamOClient(api_key="k", requests_per_second="auto", coordinator=SharedBackend())


async def test_local_slots_hand_over_in_fifo_order_and_count_what_is_held() -> None:
    """Our own counter (no write to asyncio.Semaphore._value): FIFO, counts, cancellation."""
    slots = LocalSlots(2)
    assert slots.try_acquire()
    assert slots.try_acquire()
    assert not slots.try_acquire()
    order: list[str] = []

    async def job(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first = asyncio.create_task(job("first"))
    doomed = asyncio.create_task(job("doomed"))
    last = asyncio.create_task(job("last"))
    await asyncio.sleep(0)
    assert (slots.in_use, slots.waiting) == (2, 3)
    doomed.cancel()
    await asyncio.sleep(0)
    assert not slots.try_acquire()  # "first" and "last" still queue before a newcomer
    slots.release_nowait()
    slots.release_nowait()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]
    assert (slots.in_use, slots.waiting) == (2, 0)


async def test_a_slot_handed_to_a_cancelled_waiter_goes_to_the_next() -> None:
    slots = LocalSlots(1)
    await slots.acquire()
    doomed = asyncio.create_task(slots.acquire())
    heir = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release_nowait()  # handed to "doomed"...
    doomed.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(heir, 1)
    assert slots.in_use == 1
    slots.release_nowait()
    assert slots.in_use == 0


def test_rate_burst_and_concurrency_are_checked_in_one_place() -> None:
    for bad in (0, -1, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="requests_per_second"):
            TokenBucketLimiter(rate=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="burst must be at least 1"):
        TokenBucketLimiter(rate=1, burst=0)
    with pytest.raises(ValueError, match="max_concurrency must be at least 1"):
        LocalSlots(0)
