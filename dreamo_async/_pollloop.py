"""The poll loop of a job: poll a task at the poll policy's pace until it ends or the
job's deadline passes (one timer for the whole loop)."""

from __future__ import annotations

import asyncio
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
    if on_poll is not None:
        on_poll(task)
    deadline = None if timeout is None else started + timeout
    polls = _Polls(transport, policy, rng, task, deadline, float(timeout or 0), on_poll)
    # The deadline bounds everything below (a slow answer, retries, backoff, the
    # limiter's wait): one timer for the whole loop, not one per poll, armed only once
    # the deadline is near: a far one cannot be passed by one poll (get_task bounds its
    # retries by it), and a timer (or a timeout scope) per job costs the loop. The last
    # poll, sent at the deadline, may still see the task end: its answer gets a grace.
    scope = None
    try:
        task = await polls.run(None if deadline is None else deadline - _ARM_S)
        if deadline is not None and task.status not in TERMINAL_STATUSES:
            scope = asyncio.timeout_at(deadline + _LAST_POLL_GRACE_S)
            async with scope:
                task = await polls.run(None)
    except TimeoutError as exc:
        if isinstance(exc, TaskTimeoutError) and exc.timeout:
            raise
        if isinstance(exc, TaskTimeoutError) or (scope is not None and scope.expired()):
            task = polls.task
            raise TaskTimeoutError(task.id, polls.timeout, task.raw_status) from None
        raise
    if task.status is TaskStatus.FAILED:
        error = task.error
        raise TaskFailedError(
            task.id, error.code if error else None, error.message if error else None
        )
    return GenerationResult.from_task(task)


class _Polls:
    """The polls of one task at its schedule's pace, and the latest snapshot."""

    __slots__ = ("_deadline", "_on_poll", "_schedule", "_transport", "now", "task", "timeout")

    def __init__(
        self,
        transport: Transport,
        policy: PollPolicy,
        rng: random.Random,
        task: Task,
        deadline: float | None,
        timeout: float,
        on_poll: Callable[[Task], None] | None,
    ) -> None:
        self._transport = transport
        self._deadline = deadline
        self._on_poll = on_poll
        self.timeout = timeout
        #: The latest snapshot of the task, and when it came (one clock read per answer:
        #: the next delay is reckoned from it).
        self.task = task
        self.now = asyncio.get_running_loop().time()
        self._schedule = PollSchedule(policy, started_at=self.now, rng=rng)
        self._schedule.observe(self.now, task.progress)

    async def run(self, until: float | None) -> Task:
        """Poll until the task ends, or (``until``, loop clock) the deadline is near."""
        task, now, deadline, schedule = self.task, self.now, self._deadline, self._schedule
        while task.status not in TERMINAL_STATUSES:
            if until is not None and now >= until:
                break
            delay = 0.0 if is_testing() else schedule.next_delay(now)
            if deadline is not None:
                if now >= deadline:
                    raise TaskTimeoutError(task.id, self.timeout, task.raw_status)
                delay = min(delay, deadline - now)
            if delay > 0:  # zero: poll at once, without a trip round the loop
                await asyncio.sleep(delay)
            task = await self._transport.get_task(
                task.id, deadline=math.inf if deadline is None else deadline
            )
            self.task, self.now = task, asyncio.get_running_loop().time()
            now = self.now
            schedule.observe(now, task.progress)
            if self._on_poll is not None:
                self._on_poll(task)
        return task
