"""The test suite's own waiting helper: it must not fail a test for a stall of the machine."""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import eventually


async def test_eventually_survives_a_stall_past_its_deadline() -> None:
    """A stall (here the loop's thread blocked) carries the clock past the deadline before
    the loop has had a turn to make the condition true: that is not a failure."""
    loop = asyncio.get_running_loop()
    reached: list[bool] = []

    def stall_then_reach() -> None:
        time.sleep(0.15)  # the whole process held up past the 0.05 s deadline
        loop.call_later(0.01, reached.append, True)  # the stalled work needs a round trip

    loop.call_later(0.01, stall_then_reach)
    await eventually(lambda: bool(reached), timeout=0.05)


async def test_eventually_fails_with_what_was_seen() -> None:
    with pytest.raises(AssertionError, match="not reached in time: 3 polls"):
        await eventually(lambda: False, timeout=0.01, describe=lambda: "3 polls")
