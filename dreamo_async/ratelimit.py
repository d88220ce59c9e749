"""Request pacing shared by every coroutine of a client: a limiter and a cool-down.

A :class:`RateLimiter` hands out permission to send one HTTP request. The
in-process implementation is a GCRA ("virtual scheduling") bucket on the event
loop's monotonic clock: requests are spaced ``1 / rate`` apart with at most
``burst`` let through early, so no 1-second window ever holds more than
``rate + burst`` requests, the first second included. Waiters are served in
FIFO order, polls of running tasks ahead of new creates.

Every limiter also carries the shared cool-down: after a 429 the transport
calls :meth:`RateLimiter.pause`, and every request of the client waits until
the service's ``Retry-After`` has passed.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol

__all__ = [
    "JobSlots",
    "LimitsBackend",
    "LocalLimits",
    "LocalSlots",
    "Priority",
    "RateLimiter",
    "TokenBucketLimiter",
    "UnlimitedLimiter",
]


class Priority(enum.IntEnum):
    """Which requests go first when several wait: work in flight finishes first."""

    POLL = 0
    CREATE = 1


class RateLimiter(Protocol):
    """What the transport needs from a limiter."""

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        """Wait until one request may be sent."""

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (a 429's ``Retry-After``)."""

    def record(self, status: int) -> None:
        """Feedback after each response (its HTTP status): how an adaptive limiter learns.

        Strict limiters ignore it; ``requests_per_second="auto"`` slows down on 429.
        """


class _CoolDown:
    """The shared pause after a 429: one deadline on the loop clock."""

    __slots__ = ("_until",)

    def __init__(self) -> None:
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._until = max(self._until, loop.time() + max(0.0, seconds))

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        # A loop, not an Event: another 429 may push the deadline further while we sleep.
        while (remaining := self._until - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(remaining)


class UnlimitedLimiter:
    """No rate limit; only the shared cool-down after a 429."""

    __slots__ = ("_cooldown",)

    def __init__(self) -> None:
        self._cooldown = _CoolDown()

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        await self._cooldown.wait()

    def pause(self, seconds: float) -> None:
        self._cooldown.pause(seconds)

    def record(self, status: int) -> None:
        return None

    def __repr__(self) -> str:
        return "<UnlimitedLimiter>"


class TokenBucketLimiter:
    """A strict GCRA limiter: ``rate`` requests per second, ``burst`` allowed early."""

    __slots__ = ("_cooldown", "_interval", "_lock", "_tat", "burst", "rate")

    def __init__(self, rate: float, burst: int = 1) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self._interval = 1.0 / self.rate
        #: Theoretical arrival time of the next request (GCRA state); None = idle.
        self._tat: float | None = None
        self._lock = asyncio.Lock()
        self._cooldown = _CoolDown()

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        async with self._lock:
            await self._cooldown.wait()
            loop = asyncio.get_running_loop()
            now = loop.time()
            tat = now if self._tat is None else max(self._tat, now)
            allowed_at = tat - (self.burst - 1) * self._interval
            if allowed_at > now:
                await asyncio.sleep(allowed_at - now)
            self._tat = tat + self._interval

    def pause(self, seconds: float) -> None:
        self._cooldown.pause(seconds)

    def record(self, status: int) -> None:
        return None

    def __repr__(self) -> str:
        return f"<TokenBucketLimiter rate={self.rate:g}/s burst={self.burst}>"


# --------------------------------------------------------------------------- job slots


class JobSlots(Protocol):
    """The ``max_concurrency`` slots of a client: one per job alive.

    ``acquire`` returns a token that ``release`` takes back (a Redis lease id, or
    nothing for the in-process pool). Waiters are served in FIFO order.
    """

    async def acquire(self) -> object:
        """Wait for a free slot."""

    async def release(self, token: object) -> None:
        """Give the slot back; must finish even if the caller is being cancelled
        (an implementation that awaits I/O shields it)."""

    @property
    def in_use(self) -> int:
        """Slots held by this process now."""

    @property
    def waiting(self) -> int:
        """Coroutines of this process waiting for a slot."""


class LocalSlots:
    """In-process job slots: an asyncio semaphore (FIFO) with counts."""

    __slots__ = ("_semaphore", "_waiting", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {capacity!r}")
        self.capacity = capacity
        self._semaphore = asyncio.Semaphore(capacity)
        self._waiting = 0

    async def acquire(self) -> object:
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        return None

    async def release(self, token: object) -> None:
        self._semaphore.release()

    @property
    def in_use(self) -> int:
        return self.capacity - self._semaphore._value

    @property
    def waiting(self) -> int:
        return self._waiting

    def __repr__(self) -> str:
        return f"<LocalSlots {self.in_use}/{self.capacity} in use, {self._waiting} waiting>"


class LimitsBackend(Protocol):
    """Where a client's limits are held: in this process, or shared (Redis) by many."""

    def make_limiter(self, rate: float | None, burst: int) -> RateLimiter:
        """The request limiter for ``rate`` requests/s (``None``: unlimited)."""

    def make_slots(self, max_concurrency: int) -> JobSlots:
        """The job slots."""

    async def aclose(self) -> None:
        """Release what the backend holds (connections, leases)."""


class LocalLimits:
    """The default backend: limits held in this process only."""

    def make_limiter(self, rate: float | None, burst: int) -> RateLimiter:
        return UnlimitedLimiter() if rate is None else TokenBucketLimiter(rate, burst)

    def make_slots(self, max_concurrency: int) -> JobSlots:
        return LocalSlots(max_concurrency)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return "<LocalLimits>"
