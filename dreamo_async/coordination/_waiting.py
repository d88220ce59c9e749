"""What the in-process and the Redis limiters share: one priority waiter queue, one
cool-down after a 429, and the checks of their arguments.

The queue orders waiters by ``(priority, arrival)``: polls of running tasks go ahead of
new creates (work in flight finishes first), FIFO within a priority. A waiter
cancelled while queued stays in the heap until it reaches the head, where it is
dropped without being served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["CoolDown", "Waiter", "WaiterQueue", "check_burst", "check_concurrency", "check_rate"]


def check_rate(rate: float) -> float:
    """A fixed ``requests_per_second``: a positive number."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise ValueError(f"rate (requests_per_second) must be a positive number, got {rate!r}")
    return float(rate)


def check_burst(burst: int) -> int:
    """``burst``: a whole number of requests, at least 1."""
    if isinstance(burst, bool) or not isinstance(burst, int | float) or not burst >= 1:
        raise ValueError(f"burst must be at least 1, got {burst!r}")
    return int(burst)


def check_concurrency(capacity: int) -> int:
    """``max_concurrency``: a whole number of job slots, at least 1."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {capacity!r}")
    return capacity


class Waiter:
    """One queued caller: its heap key and the future that serves it."""

    __slots__ = ("future", "grant", "key")

    def __init__(self, key: tuple[int, int], future: asyncio.Future[bool]) -> None:
        self.key = key
        self.future = future
        #: Free for the queue's owner (the token bucket keeps a grant to undo it).
        self.grant: tuple[float | None, float] | None = None

    def __lt__(self, other: Waiter) -> bool:
        return self.key < other.key


class WaiterQueue:
    """Waiters by ``(priority, arrival)``; cancelled ones are skipped at the head."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Waiter] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Entries in the heap, cancelled ones not yet dropped included (0: nobody queues)."""
        return len(self._heap)

    def push(self, priority: int) -> Waiter:
        waiter = Waiter((priority, next(self._seq)), asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        return waiter

    def head(self) -> Waiter | None:
        """The first waiter still waiting (cancelled ones ahead of it are dropped)."""
        heap = self._heap
        while heap and heap[0].future.done():
            heapq.heappop(heap)
        return heap[0] if heap else None

    def pop(self) -> Waiter | None:
        """Remove and return :meth:`head`."""
        head = self.head()
        if head is not None:
            heapq.heappop(self._heap)
        return head

    @property
    def waiting(self) -> int:
        """Callers still waiting."""
        return sum(1 for waiter in self._heap if not waiter.future.done())


class CoolDown:
    """The shared pause after a 429: one deadline on the loop clock, for every request."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        #: Loop time before which nothing is sent (0: never paused).
        self.until = 0.0

    def pause(self, seconds: float) -> bool:
        """Hold everything for ``seconds`` from now; True if that moved the deadline."""
        until = asyncio.get_running_loop().time() + max(0.0, seconds)
        if until <= self.until:
            return False
        self.until = until
        return True

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        # A loop, not an Event: another 429 may push the deadline further while we sleep.
        while (remaining := self.until - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(remaining)
