"""Job starts take turns: at most one job's synchronous start per trip round the loop.

A burst of calls (fifty web handlers woken by one read, a ``gather`` of hundreds) would
otherwise run every job's start (the request check, the images' classification, the
hop to the path check) in the same loop turn, and the loop would be late for everything
else by their sum. Here the first call of a turn starts at once; the others wait for
later turns, in call order.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["StartTurns"]


class StartTurns:
    """A first-come first-served queue of job starts, one per loop turn."""

    __slots__ = ("_loop", "_taken", "_waiting")

    def __init__(self) -> None:
        #: A start was let through in the current turn (its release is scheduled).
        self._taken = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait_turn(self) -> None:
        """Return in a loop turn no other job start has had (at once if this one is free)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop: what was held in the old one is gone
            self._loop, self._taken = loop, False
            self._waiting.clear()
        if not self._taken:
            self._taken = True
            loop.call_soon(self._next_turn)
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        await waiter  # a cancelled waiter is skipped by _next_turn

    def _next_turn(self) -> None:
        """A new loop turn: wake the next start still waiting, else free the turn."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it runs in the next turn, and holds that one
                waiter.get_loop().call_soon(self._next_turn)
                return
        self._taken = False
