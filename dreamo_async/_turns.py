"""Job starts take turns: at most a few jobs' synchronous starts per trip round the loop.

A burst of calls (fifty web handlers woken by one read, a ``gather`` of hundreds) would
otherwise run every job's start (the request check, the images' classification, the
hop to the path check) in the same loop turn, and the loop would be late for everything
else by their sum. Here the first :data:`STARTS_PER_TURN` calls of a turn start at once;
the others wait for later turns, in call order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

__all__ = ["STARTS_PER_TURN", "StartTurns"]

#: Job starts one loop turn may run: few enough that a burst cannot make one turn long,
#: enough that workers ending jobs in the same turn are not held back to the next
#: (the figures: benchmarks/README.md, "Job starts take turns").
STARTS_PER_TURN: Final = 8


class StartTurns:
    """A first-come first-served queue of job starts, a few per loop turn."""

    __slots__ = ("_loop", "_started", "_waiting")

    def __init__(self) -> None:
        #: Starts let through since the current turn began; 0: no turn is being counted
        #: (nothing scheduled to end it).
        self._started = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait_turn(self) -> None:
        """Return in a loop turn that has room for one more job start (at once if this one has)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop: what was held in the old one is gone
            self._loop, self._started = loop, 0
            self._waiting.clear()
        if self._started < STARTS_PER_TURN and not self._waiting:
            if self._started == 0:
                loop.call_soon(self._next_turn)
            self._started += 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        await waiter  # a cancelled waiter is skipped by _next_turn

    def _next_turn(self) -> None:
        """A new loop turn: the starts still waiting go first, as many as a turn holds."""
        self._started = 0
        waiting = self._waiting
        while waiting and self._started < STARTS_PER_TURN:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it runs in the next turn, counted in this batch
                self._started += 1
        if self._started:
            asyncio.get_running_loop().call_soon(self._next_turn)
