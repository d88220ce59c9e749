"""When to poll next: a pure schedule, no I/O, no clock of its own.

The provider's own CLI polls every 5 s for at most 600 s. We poll sooner at
first (most tasks are short), back off geometrically to ``max_delay``, and
when the service reports ``progress`` we estimate the finish time from the
observed rate and poll just after it: fewer polls and a shorter wait.
"""

from __future__ import annotations

import math
import random
from typing import Final

import attrs

from .retry import exponential_delay

__all__ = ["PollPolicy", "PollSchedule"]

#: Shortest delay between two polls, whatever the estimate says.
_MIN_DELAY: Final = 0.05


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"PollPolicy.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class PollPolicy:
    """How a job polls its task.

    The delay starts at ``initial_delay`` and grows by ``multiplier`` up to
    ``max_delay``; each delay is spread by ``±jitter`` (a fraction) so that
    many jobs started together do not poll in lock-step. ``timeout`` is the
    default deadline of a job, in seconds (``None``: no deadline, not advised).
    """

    initial_delay: float = attrs.field(default=1.0, validator=_non_negative)
    max_delay: float = attrs.field(default=10.0, validator=_non_negative)
    multiplier: float = attrs.field(default=1.5, validator=_non_negative)
    jitter: float = attrs.field(default=0.1, validator=[_non_negative, attrs.validators.le(1.0)])
    #: Use the service's ``progress`` to poll near the expected finish.
    use_progress: bool = True
    #: After the estimated finish, poll again this long after (seconds).
    finish_margin: float = attrs.field(default=0.1, validator=_non_negative)
    #: Without a progress estimate, no delay exceeds this fraction of the time the job
    #: has run so far (never below ``initial_delay``): a task that ends is seen within
    #: about that fraction of its duration, whatever its length (``None``: no cap).
    max_relative_delay: float | None = attrs.field(default=0.15)
    timeout: float | None = attrs.field(default=600.0)

    def __attrs_post_init__(self) -> None:
        if self.multiplier < 1.0:
            raise ValueError("PollPolicy.multiplier must be >= 1")
        if self.max_delay < self.initial_delay:
            raise ValueError("PollPolicy.max_delay must be >= initial_delay")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError("PollPolicy.timeout must be positive or None")
        if self.max_relative_delay is not None and not self.max_relative_delay > 0:
            raise ValueError("PollPolicy.max_relative_delay must be positive or None")

    def backoff_delay(self, attempt: int) -> float:
        """The un-jittered delay before poll number ``attempt`` (0-based)."""
        return exponential_delay(self.initial_delay, self.multiplier, self.max_delay, attempt)


@attrs.define
class PollSchedule:
    """The poll delays of one task; feed it each observation, ask for the next delay.

    Times are whatever monotonic clock the caller uses (the event loop's).
    """

    policy: PollPolicy
    #: When the task was created (or first seen), on the caller's clock.
    started_at: float
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    attempt: int = 0
    _last_progress: tuple[float, float] | None = attrs.field(default=None, alias="_last_progress")
    _rate: float | None = attrs.field(default=None, alias="_rate")
    #: Polls made after the estimated finish had passed (the estimate was early).
    _overdue: int = attrs.field(default=0, alias="_overdue")

    def observe(self, now: float, progress: float | None) -> None:
        """Record a poll answer's ``progress`` (0..1) seen at ``now``."""
        if progress is None or not self.policy.use_progress:
            return
        previous = self._last_progress
        if previous is not None and now > previous[0] and progress > previous[1]:
            self._rate = (progress - previous[1]) / (now - previous[0])
        elif previous is None and progress > 0 and self._measurable(now - self.started_at):
            # Progress made since the start, when the start is known well enough: not
            # for a task first seen already under way (``wait`` on a resumed task),
            # whose rate would come out absurd; the next observation gives it.
            self._rate = progress / (now - self.started_at)
        self._last_progress = (now, progress)

    def _measurable(self, elapsed: float) -> bool:
        return elapsed > 0 and elapsed >= self.policy.initial_delay / 2

    def next_delay(self, now: float) -> float:
        """Seconds to wait before the next poll."""
        delay = self.policy.backoff_delay(self.attempt)
        estimate = self._estimated_remaining(now)
        self.attempt += 1
        if estimate is not None:
            # Poll just after the expected finish, but never beyond max_delay so a
            # wrong estimate costs at most one long wait.
            return min(self.policy.max_delay, max(_MIN_DELAY, estimate + self.policy.finish_margin))
        jitter = self.policy.jitter
        relative = self.policy.max_relative_delay
        cap = (
            max(self.policy.initial_delay, relative * (now - self.started_at))
            if relative is not None
            else math.inf
        )
        if delay >= cap:  # a hard cap: jitter only below it
            return cap * self.rng.uniform(1.0 - jitter, 1.0) if jitter else cap
        if jitter:
            delay *= self.rng.uniform(1.0 - jitter, 1.0 + jitter)
        return min(delay, cap)

    def _estimated_remaining(self, now: float) -> float | None:
        if self._rate is None or self._last_progress is None or self._rate <= 0:
            return None
        seen_at, progress = self._last_progress
        if progress >= 1.0:
            return 0.0
        finish = seen_at + (1.0 - progress) / self._rate
        remaining = finish - now
        if remaining <= 0:
            # Past the estimate and not done yet: short retries, growing each time.
            self._overdue += 1
            return min(
                self.policy.max_delay,
                max(_MIN_DELAY, self.policy.finish_margin) * 2.0 ** min(self._overdue - 1, 16),
            )
        self._overdue = 0
        return remaining
