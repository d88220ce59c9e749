"""How failed requests are retried: one policy object, full jitter, server hints first.

Backoff follows "full jitter" (a random delay between 0 and the exponential
cap), which spreads out retries of many clients best. A hint from the service
(``Retry-After`` or a ``retry_after`` field) wins over the schedule; a hint
longer than ``max_retry_after`` raises instead of sleeping for minutes.

For users' own tests, :func:`set_testing` zeroes every delay (like stamina's).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import random

import attrs

__all__ = ["RetryPolicy", "exponential_delay", "is_testing", "parse_retry_after", "set_testing"]

_testing = False


def set_testing(enabled: bool = True) -> None:
    """Zero every retry and poll delay (for tests of code that uses this library)."""
    global _testing
    _testing = enabled


def is_testing() -> bool:
    """Whether :func:`set_testing` is on."""
    return _testing


def exponential_delay(initial: float, multiplier: float, cap: float, step: int) -> float:
    """The library's one backoff formula: ``initial * multiplier**step``, at most ``cap``
    (retries and polls both grow by it; ``step`` is 0 for the first delay)."""
    return min(cap, initial * multiplier ** min(step, 64))


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Retries of one HTTP request (a poll, a download, a create that surely made nothing)."""

    #: Attempts in all, the first included (1 = never retry).
    max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    #: Cap of the first backoff, seconds.
    initial_delay: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    #: Largest backoff, seconds.
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    multiplier: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    #: A server hint longer than this raises ``RateLimitError`` instead of sleeping.
    max_retry_after: float = attrs.field(default=120.0, validator=attrs.validators.ge(0))
    #: After a 429 without a hint, every request of the client waits this long.
    rate_limit_pause: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``retry`` (1-based): uniform in [0, cap]."""
        if _testing:
            return 0.0
        cap = exponential_delay(self.initial_delay, self.multiplier, self.max_delay, retry - 1)
        return (rng or random).uniform(0.0, cap)

    def delay(self, retry: int, hint: float | None, rng: random.Random | None = None) -> float:
        """The delay to use: the server's hint when given, else the backoff."""
        if _testing:
            return 0.0
        if hint is not None:
            return max(0.0, hint)
        return self.backoff(retry, rng)


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):  # Overflow: year 99999999999
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    current = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - current).total_seconds())
