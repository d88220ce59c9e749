"""The pure schedules: poll delays and retry backoff, Retry-After parsing."""

from __future__ import annotations

import datetime as dt
import random

import pytest

import dreamo_async as d
from dreamo_async.polling import PollSchedule
from dreamo_async.retry import parse_retry_after


def test_backoff_grows_geometrically_to_the_cap() -> None:
    policy = d.PollPolicy(
        initial_delay=1.0, max_delay=10.0, multiplier=1.5, jitter=0.0, max_relative_delay=None
    )
    schedule = PollSchedule(policy, started_at=0.0)
    delays = [schedule.next_delay(0.0) for _ in range(8)]
    assert delays[:4] == [1.0, 1.5, 2.25, 3.375]
    assert delays[-1] == 10.0


def test_jitter_stays_within_its_fraction() -> None:
    policy = d.PollPolicy(initial_delay=2.0, max_delay=2.0, jitter=0.1)
    schedule = PollSchedule(policy, started_at=0.0, rng=random.Random(1))
    delays = [schedule.next_delay(0.0) for _ in range(200)]
    assert all(1.8 <= x <= 2.2 for x in delays)
    assert len(set(delays)) > 100


def test_progress_estimates_the_finish() -> None:
    policy = d.PollPolicy(jitter=0.0, finish_margin=0.1, max_delay=30.0)
    schedule = PollSchedule(policy, started_at=0.0)
    schedule.observe(2.0, 0.1)  # 10 % after 2 s: 20 s in all
    assert schedule.next_delay(2.0) == pytest.approx(18.1)
    schedule.observe(10.0, 0.5)
    assert schedule.next_delay(10.0) == pytest.approx(10.1)


def test_progress_estimate_never_exceeds_max_delay() -> None:
    policy = d.PollPolicy(jitter=0.0, max_delay=5.0)
    schedule = PollSchedule(policy, started_at=0.0)
    schedule.observe(1.0, 0.01)
    assert schedule.next_delay(1.0) == 5.0


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_relative_cap_keeps_delays_within_a_share_of_the_elapsed_time(jitter: float) -> None:
    policy = d.PollPolicy(initial_delay=1.0, max_delay=10.0, jitter=jitter, max_relative_delay=0.15)
    schedule = PollSchedule(policy, started_at=0.0, rng=random.Random(5))
    now, delays = 0.0, []
    while now < 120:
        delay = schedule.next_delay(now)
        delays.append(delay)
        assert delay <= max(1.0, 0.15 * now) + 1e-9
        now += delay
    assert delays[0] <= 1.0
    assert max(delays) <= 10.0 * (1 + jitter)  # max_delay still applies on long tasks
    assert max(delays) >= 9.0
    if jitter == 0.0:
        assert delays[0] == 1.0
        assert max(delays) == 10.0  # the cap itself, exactly


def test_an_early_estimate_retries_soon_then_backs_off() -> None:
    policy = d.PollPolicy(jitter=0.0, finish_margin=0.1, max_delay=30.0)
    schedule = PollSchedule(policy, started_at=0.0)
    schedule.observe(1.0, 0.5)  # "done at 2 s"
    assert schedule.next_delay(1.0) == pytest.approx(1.1)
    schedule.observe(2.1, 0.9)  # slower than thought
    overdue = [schedule.next_delay(2.6) for _ in range(3)]
    assert overdue[0] <= 0.5
    assert overdue == sorted(overdue)


def test_poll_policy_validates() -> None:
    with pytest.raises(ValueError, match="multiplier"):
        d.PollPolicy(multiplier=0.5)
    with pytest.raises(ValueError, match="max_delay"):
        d.PollPolicy(initial_delay=5, max_delay=1)
    with pytest.raises(ValueError, match="timeout"):
        d.PollPolicy(timeout=0)
    with pytest.raises(ValueError, match="max_relative_delay"):
        d.PollPolicy(max_relative_delay=0)


def test_full_jitter_backoff_is_bounded_by_the_cap() -> None:
    policy = d.RetryPolicy(initial_delay=0.5, max_delay=4.0)
    rng = random.Random(3)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        values = [policy.backoff(retry, rng) for _ in range(100)]
        assert all(0 <= v <= cap for v in values)
        assert max(values) > cap * 0.8


def test_hint_wins_and_testing_mode_zeroes() -> None:
    policy = d.RetryPolicy()
    assert policy.delay(1, 7.0) == 7.0
    d.set_testing(True)
    try:
        assert policy.delay(1, 7.0) == 0.0
        assert policy.backoff(5) == 0.0
    finally:
        d.set_testing(False)


def test_retry_after_forms() -> None:
    now = dt.datetime(2026, 11, 24, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Tue, 24 Nov 2026 12:00:05 GMT", now=now) == 5.0
    assert parse_retry_after("Tue, 24 Nov 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None


def test_a_task_first_seen_under_way_does_not_get_an_absurd_finish_estimate() -> None:
    """``wait`` on a task at 50 %: progress seen a microsecond after the schedule starts
    says nothing about its speed; the next poll is the usual first delay, not 0.1 s."""
    policy = d.PollPolicy(initial_delay=1.0, jitter=0.0)
    schedule = PollSchedule(policy, started_at=100.0)
    schedule.observe(100.000001, 0.5)
    assert schedule.next_delay(100.000001) == pytest.approx(1.0)
    schedule.observe(101.0, 0.6)  # 10 % per second from here: done in 4 s
    assert 4.0 <= schedule.next_delay(101.0) <= 4.0 + policy.finish_margin + 1e-9
