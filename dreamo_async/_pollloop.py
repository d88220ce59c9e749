"""The poll loop of a job: poll a task at the poll policy's pace until it ends or the
job's deadline passes (one timer for the whole loop)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Callable
from typing import Final

from .errors import TaskFailedError, TaskTimeoutError
from .models import TERMINAL_STATUSES, GenerationResult, Task, TaskStatus
from .polling import PollPolicy, PollSchedule
from .retry import is_testing
from .transport import Transport

#: How long past a job's deadline the answer of a poll sent at the deadline is awaited.
_LAST_POLL_GRACE_S: Final = 0.05
#: A job's deadline nearer than this arms the poll loop's timer: more than one poll
#: attempt's timeout can last.
_ARM_S: Final = 120.0


async def poll_until_end(
    transport: Transport,
    policy: PollPolicy,
    rng: random.Random,
    task: Task,
    *,
    started: float,
    timeout: float | None,
    on_poll: Callable[[Task], None] | None = None,
) -> GenerationResult:
    """Poll ``task`` until it ends; raise :class:`TaskTimeoutError` past ``timeout``
    (seconds from ``started``) and :class:`TaskFailedError` if it failed."""
    loop = asyncio.get_running_loop()
    if on_poll is not None:
        on_poll(task)
    deadline = None if timeout is None else started + timeout
    now = loop.time()  # one clock read per answer: the next delay is reckoned from it
    schedule = PollSchedule(policy, started_at=now, rng=rng)
    schedule.observe(now, task.progress)
    # The deadline bounds everything below (a slow answer, retries, backoff, the
    # limiter's wait): one timer for the whole loop, not one per poll. The last poll,
    # sent at the deadline, may still see the task end: its answer gets a short grace.
    # Its timer is armed only once the deadline is near: a far one cannot be passed by
    # one poll (get_task bounds its retries by it), and a timer per job costs the loop.
    scope = asyncio.timeout(None) if deadline is not None else None
    try:
        async with scope or contextlib.nullcontext():
            while task.status not in TERMINAL_STATUSES:
                delay = 0.0 if is_testing() else schedule.next_delay(now)
                if deadline is not None:
                    if now >= deadline:
                        raise TaskTimeoutError(task.id, float(timeout or 0), task.raw_status)
                    delay = min(delay, deadline - now)
                    if scope is not None and scope.when() is None and deadline - now < _ARM_S:
                        scope.reschedule(deadline + _LAST_POLL_GRACE_S)
                if delay > 0:  # zero: poll at once, without a trip round the loop
                    await asyncio.sleep(delay)
                task = await transport.get_task(
                    task.id, deadline=math.inf if deadline is None else deadline
                )
                now = loop.time()
                schedule.observe(now, task.progress)
                if on_poll is not None:
                    on_poll(task)
    except TimeoutError as exc:
        if isinstance(exc, TaskTimeoutError) and exc.timeout:
            raise
        if isinstance(exc, TaskTimeoutError) or (scope is not None and scope.expired()):
            raise TaskTimeoutError(task.id, float(timeout or 0), task.raw_status) from None
        raise
    if task.status is TaskStatus.FAILED:
        error = task.error
        raise TaskFailedError(
            task.id, error.code if error else None, error.message if error else None
        )
    return GenerationResult.from_task(task)
