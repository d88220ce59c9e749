"""Request pacing shared by every coroutine of a client: a limiter and a cool-down.

A :class:`RateLimiter` hands out permission to send one HTTP request.

:class:`TokenBucketLimiter` is a GCRA ("virtual scheduling") limiter on the event
loop's monotonic clock. Requests are spaced ``1 / rate`` apart with ``burst - 1``
allowed early, and the state starts *empty* (the theoretical arrival time is "now"
on first use), so over ANY 1-second window, the very first included, at most
``rate + burst`` requests leave. Waiters sit in one heap ordered by
``(priority, arrival)``: polls of running tasks go ahead of new creates (work in
flight finishes first), FIFO within a priority. A single ``loop.call_at`` timer
wakes the head of the heap when its slot comes; nobody spins or sleeps on their
own. A waiter cancelled while queued is dropped without using a slot; one
cancelled after its slot was granted gives the slot back when nothing was granted
after it.

Every limiter also carries the shared cool-down: after a 429 the transport calls
:meth:`RateLimiter.pause` and *every* request of the client waits until the
service's ``Retry-After`` has passed (one deadline, not each coroutine on its own).

:class:`AdaptiveLimiter` (``requests_per_second="auto"``) learns the service's
limit from :meth:`RateLimiter.record`: slow start (the rate doubles after each
clean second in which callers had to wait), then AIMD: the first 429 halves the
rate, later ones multiply it by 0.85 at most once per second, and each clean,
busy second adds 0.5 request/s.

Why our own code and not aiolimiter or limits: aiolimiter's leaky bucket starts
full, so its first second lets ``rate + capacity`` requests through on top of the
steady flow (the window guarantee above fails), it has no priorities and no
shared pause; ``limits`` offers window/GCRA *checks* (``hit``/``test``) but no
waiting queue, so fair waiting, priorities, the cool-down and cancellation would
all still be ours. The whole limiter is one heap and one timer.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
from typing import Final, Protocol

__all__ = [
    "AdaptiveLimiter",
    "JobSlots",
    "LimitsBackend",
    "LocalLimits",
    "LocalSlots",
    "Priority",
    "RateLimiter",
    "TokenBucketLimiter",
    "UnlimitedLimiter",
]


#: Most lateness (timer or resumption lag) absorbed without moving the schedule.
_JITTER_S: Final = 0.005


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
        """Wait out the cool-down after a 429, if one was ever set (the transport skips
        this call until then: see :attr:`never_paused`)."""
        if not self.never_paused:
            await self._cooldown.wait()

    @property
    def never_paused(self) -> bool:
        """True until the first :meth:`pause`: ``acquire`` would return at once, so the
        transport skips the call (a coroutine per request) altogether."""
        return self._cooldown._until <= 0.0

    def pause(self, seconds: float) -> None:
        self._cooldown.pause(seconds)

    def record(self, status: int) -> None:
        return None

    def __repr__(self) -> str:
        return "<UnlimitedLimiter>"


class _Waiter:
    """One queued ``acquire``: its heap key and the future the timer resolves."""

    __slots__ = ("future", "grant", "key")

    def __init__(self, key: tuple[int, int], future: asyncio.Future[None]) -> None:
        self.key = key
        self.future = future
        #: ``(tat before, tat after)`` once granted: lets a cancelled grant be undone.
        self.grant: tuple[float | None, float] | None = None

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


class TokenBucketLimiter:
    """A strict GCRA limiter: ``rate`` requests per second, ``burst`` allowed at once.

    Over any 1-second window at most ``rate + burst`` requests are let through,
    from the first second on. Polls go ahead of creates; FIFO within each.
    """

    __slots__ = (
        "_busy",
        "_cooldown_until",
        "_heap",
        "_interval",
        "_seq",
        "_tat",
        "_timer",
        "_timer_at",
        "burst",
        "rate",
    )

    def __init__(self, rate: float, burst: int = 1) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.burst = int(burst)
        self.rate = float(rate)
        self._interval = 1.0 / self.rate
        #: Theoretical arrival time of the next request (GCRA state); None = never used.
        self._tat: float | None = None
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._cooldown_until = 0.0
        #: Set whenever a caller had to queue (the limiter was the bottleneck).
        self._busy = False

    # -- the protocol --------------------------------------------------------------------

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._heap and now >= self._cooldown_until and self._ready_at(now) <= now:
            self._take(now)  # fast path: free slot, nobody queued
            return
        self._busy = True
        waiter = _Waiter((int(priority), next(self._seq)), loop.create_future())
        heapq.heappush(self._heap, waiter)
        self._schedule(loop)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.grant is not None:
                before, after = waiter.grant
                if self._tat == after:  # nothing granted since: the slot goes back
                    self._tat = before
            # else: still queued; _next_live() drops it (its future is cancelled)
            self._schedule(loop)
            raise
        # A busy loop may resume us well after the grant. Lag up to the jitter
        # allowance is absorbed by the bound's spare request; beyond it, count the
        # request as sent now (minus the allowance) so lag never bunches requests.
        floor = loop.time() + self._interval - self._jitter
        if self._tat is not None and floor > self._tat:
            self._tat = floor

    def pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, seconds)
        if until > self._cooldown_until:
            self._cooldown_until = until
            self._schedule(loop)

    def record(self, status: int) -> None:
        return None

    # -- internals -------------------------------------------------------------------------

    def _ready_at(self, now: float) -> float:
        """When the next request may leave (GCRA: TAT minus the burst tolerance)."""
        if self._tat is None:
            return now
        return self._tat - (self.burst - 1) * self._interval

    def _take(self, now: float) -> tuple[float | None, float]:
        before = self._tat
        after = (now if before is None else max(before, now)) + self._interval
        self._tat = after
        return before, after

    def _next_live(self) -> _Waiter | None:
        heap = self._heap
        while heap and heap[0].future.done():  # cancelled while queued
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep exactly one timer, set for when the head of the queue may go."""
        head = self._next_live()
        if head is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        now = loop.time()
        when = max(self._cooldown_until, self._ready_at(now))
        if self._timer is not None:
            if self._timer_at == when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._wake, loop)

    @property
    def _jitter(self) -> float:
        """How late a grant may act on time (timer or resumption lag), keeping the bound.

        GCRA puts at most ``rate + burst - 1`` points in any 1-s window; a request sent
        up to less than one interval after its point adds at most the one spare request
        to any window. Lateness within the allowance keeps the schedule (no rate lost
        to timer jitter); beyond it the schedule moves on.
        """
        return min(0.5 * self._interval, _JITTER_S)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        if 0.0 <= now - self._timer_at <= self._jitter:
            now = self._timer_at  # fired a little late: grant on schedule
        while now >= self._cooldown_until and (head := self._next_live()) is not None:
            # call_at may fire a hair early (clock resolution): allow 1 µs.
            if self._ready_at(now) > now + 1e-6:
                break
            heapq.heappop(self._heap)
            head.grant = self._take(now)
            head.future.set_result(None)
        self._schedule(loop)

    @property
    def waiting(self) -> int:
        """Callers queued now."""
        return sum(1 for w in self._heap if not w.future.done())

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} rate={self.rate:g}/s burst={self.burst} "
            f"waiting={self.waiting}>"
        )


class AdaptiveLimiter(TokenBucketLimiter):
    """``requests_per_second="auto"``: learns the service's limit from its 429 answers.

    TCP-like: slow start doubles the rate after each clean second in which callers
    had to wait; the first 429 halves it and ends slow start; after that AIMD, +0.5
    request/s per clean busy second and x0.85 per 429 (at most one cut per second,
    so a burst of 429s from one overshoot counts once). Idle seconds change nothing:
    a limit is only learned while it is the bottleneck.
    """

    __slots__ = ("_clean", "_last_cut", "_last_step", "_slow_start", "max_rate", "min_rate")

    #: Added after each clean, busy second (requests/s).
    INCREASE: Final = 0.5
    #: Multiplied on a 429 after the first one.
    DECREASE: Final = 0.85

    def __init__(
        self,
        initial_rate: float = 5.0,
        burst: int = 1,
        *,
        min_rate: float = 0.2,
        max_rate: float = 1000.0,
    ) -> None:
        super().__init__(initial_rate, burst)
        self.min_rate = float(min_rate)
        self.max_rate = float(max_rate)
        self._slow_start = True
        #: When the last 1-s step began (None: before the first answer).
        self._last_step: float | None = None
        #: When the rate was last cut (cuts are at most one per second).
        self._last_cut = -1e9
        #: No 429 since the current step began.
        self._clean = True

    def record(self, status: int) -> None:
        now = asyncio.get_running_loop().time()
        if self._last_step is None:
            self._last_step = now
        if status == 429:
            self._clean = False
            if self._slow_start:
                self._slow_start = False
                self._cut(self.rate / 2.0, now)
            elif now - self._last_cut >= 1.0:
                self._cut(self.rate * self.DECREASE, now)
            return
        if now - self._last_step < 1.0:
            return
        # A second has passed: grow only if it was clean and callers had to wait.
        if self._clean and self._busy:
            grown = self.rate * 2.0 if self._slow_start else self.rate + self.INCREASE
            self._set_rate(grown)
        self._last_step = now
        self._clean = True
        self._busy = bool(self._heap)

    def settle(self, rate: float) -> None:
        """Start from a rate measured elsewhere (what the service accepted in the second
        before its first 429): no slow start, only the AIMD steps from there."""
        self._slow_start = False
        self._set_rate(rate)

    def _cut(self, rate: float, now: float) -> None:
        self._set_rate(rate)
        self._last_cut = self._last_step = now  # a fresh step starts at the new rate
        self._busy = bool(self._heap)

    def _set_rate(self, rate: float) -> None:
        self.rate = min(self.max_rate, max(self.min_rate, rate))
        self._interval = 1.0 / self.rate
        if self._heap:
            self._schedule(asyncio.get_running_loop())


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

    def try_acquire(self) -> bool:
        """Take a slot without waiting when one is free and nobody queues before us
        (FIFO holds); the client's hot path, with no coroutine. False: use ``acquire``."""
        semaphore = self._semaphore
        if semaphore.locked():  # no free slot, or waiters ahead
            return False
        semaphore._value -= 1
        return True

    def release_nowait(self) -> None:
        """``release`` without a coroutine (the in-process slot needs no I/O)."""
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

    def make_adaptive_limiter(self, burst: int) -> RateLimiter:
        """The limiter of ``requests_per_second="auto"``. Optional: the client refuses
        ``"auto"`` with a backend that lacks it (a learned rate is per process, and a
        shared backend would silently stop sharing)."""
        return AdaptiveLimiter(burst=burst)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return "<LocalLimits>"
