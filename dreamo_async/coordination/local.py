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
import collections
from typing import Final

from ._waiting import CoolDown, WaiterQueue, check_burst, check_concurrency, check_rate
from .protocols import JobSlots, Priority, RateLimiter

__all__ = [
    "AdaptiveLimiter",
    "LocalCoordinator",
    "LocalSlots",
    "TokenBucketLimiter",
    "UnlimitedLimiter",
]


#: Most lateness (timer or resumption lag) absorbed without moving the schedule.
_JITTER_S: Final = 0.005


class UnlimitedLimiter:
    """No rate limit; only the shared cool-down after a 429."""

    __slots__ = ("_cooldown",)

    def __init__(self) -> None:
        self._cooldown = CoolDown()

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        """Wait out the cool-down after a 429, if one was ever set (the transport skips
        this call until then: see :attr:`never_paused`)."""
        if not self.never_paused:
            await self._cooldown.wait()

    @property
    def never_paused(self) -> bool:
        """True until the first :meth:`pause`: ``acquire`` would return at once, so the
        transport skips the call (a coroutine per request) altogether."""
        return self._cooldown.until <= 0.0

    def pause(self, seconds: float) -> None:
        self._cooldown.pause(seconds)

    def record(self, status: int) -> None:
        return None

    def __repr__(self) -> str:
        return "<UnlimitedLimiter>"


class TokenBucketLimiter:
    """A strict GCRA limiter: ``rate`` requests per second, ``burst`` allowed at once.

    Over any 1-second window at most ``rate + burst`` requests are let through,
    from the first second on. Polls go ahead of creates; FIFO within each.
    """

    __slots__ = (
        "_busy",
        "_cooldown",
        "_interval",
        "_queue",
        "_tat",
        "_timer",
        "_timer_at",
        "burst",
        "rate",
    )

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.burst = check_burst(burst)
        self.rate = check_rate(rate)
        self._interval = 1.0 / self.rate
        #: Theoretical arrival time of the next request (GCRA state); None = never used.
        self._tat: float | None = None
        self._queue = WaiterQueue()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._cooldown = CoolDown()
        #: Set whenever a caller had to queue (the limiter was the bottleneck).
        self._busy = False

    # -- the protocol --------------------------------------------------------------------

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._queue and now >= self._cooldown.until and self._ready_at(now) <= now:
            self._take(now)  # fast path: free slot, nobody queued
            return
        self._busy = True
        waiter = self._queue.push(int(priority))
        self._schedule(loop)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.grant is not None:
                before, after = waiter.grant
                if self._tat == after:  # nothing granted since: the slot goes back
                    self._tat = before
            # else: still queued; the queue drops it at the head (its future is cancelled)
            self._schedule(loop)
            raise
        # A busy loop may resume us well after the grant. Lag up to the jitter
        # allowance is absorbed by the bound's spare request; beyond it, count the
        # request as sent now (minus the allowance) so lag never bunches requests.
        floor = loop.time() + self._interval - self._jitter
        if self._tat is not None and floor > self._tat:
            self._tat = floor

    def pause(self, seconds: float) -> None:
        if self._cooldown.pause(seconds):
            self._schedule(asyncio.get_running_loop())

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

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep exactly one timer, set for when the head of the queue may go."""
        if self._queue.head() is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        now = loop.time()
        when = max(self._cooldown.until, self._ready_at(now))
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
        while now >= self._cooldown.until and (head := self._queue.head()) is not None:
            # call_at may fire a hair early (clock resolution): allow 1 µs.
            if self._ready_at(now) > now + 1e-6:
                break
            self._queue.pop()
            head.grant = self._take(now)
            head.future.set_result(True)
        self._schedule(loop)

    @property
    def waiting(self) -> int:
        """Callers queued now."""
        return self._queue.waiting

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
        self._busy = bool(self._queue)

    def settle(self, rate: float) -> None:
        """Start from a rate measured elsewhere (what the service accepted in the second
        before its first 429): no slow start, only the AIMD steps from there."""
        self._slow_start = False
        self._set_rate(rate)

    def _cut(self, rate: float, now: float) -> None:
        self._set_rate(rate)
        self._last_cut = self._last_step = now  # a fresh step starts at the new rate
        self._busy = bool(self._queue)

    def _set_rate(self, rate: float) -> None:
        self.rate = min(self.max_rate, max(self.min_rate, rate))
        self._interval = 1.0 / self.rate
        if self._queue:
            self._schedule(asyncio.get_running_loop())


# --------------------------------------------------------------------------- job slots


class LocalSlots:
    """In-process job slots: FIFO waiters, and a count of the slots held."""

    __slots__ = ("_held", "_waiters", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = check_concurrency(capacity)
        self._held = 0
        #: Futures of the waiting callers, oldest first; a slot is handed over on release.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> object:
        if self.try_acquire():
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release_nowait()  # handed a slot as we were cancelled: pass it on
            raise
        return None

    async def release(self, token: object) -> None:
        self.release_nowait()

    def try_acquire(self) -> bool:
        """Take a slot without waiting when one is free and nobody queues before us
        (FIFO holds); the client's hot path, with no coroutine. False: use ``acquire``."""
        waiters = self._waiters
        while waiters and waiters[0].done():  # cancelled while waiting
            waiters.popleft()
        if self._held >= self.capacity or waiters:
            return False
        self._held += 1
        return True

    def release_nowait(self) -> None:
        """``release`` without a coroutine (the in-process slot needs no I/O): the slot
        goes to the oldest waiter still waiting, else back to the pool."""
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot moves over: _held stays
                return
        self._held -= 1

    @property
    def in_use(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        return sum(1 for future in self._waiters if not future.done())

    def __repr__(self) -> str:
        return f"<LocalSlots {self.in_use}/{self.capacity} in use, {self.waiting} waiting>"


class LocalCoordinator:
    """The default coordinator: request pacing and job slots held in this process only."""

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
        return "<LocalCoordinator>"
