"""The watcher of abandoned tasks: a job that ends early (its deadline, a cancellation)
once its task exists, or while its create is in flight, hands the task and its job slot
to a background watcher, which polls it until the service reports its end and keeps the
end for ``DreamOClient.wait``. ``max_concurrency`` so bounds what runs at the service.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine
from typing import Any, Final, Protocol

from ._jobs import _Job
from .coordination import Budget
from .errors import DreamOError, TaskFailedError, TaskTimeoutError
from .models import GenerationResult, Task

logger = logging.getLogger("dreamo_async")

#: Results of watched tasks kept for ``wait`` (the most recent; each is a few hundred bytes).
_KEPT_RESULTS: Final = 256


class _Poll(Protocol):
    def __call__(
        self, task: Task, *, started: float, timeout: float | None
    ) -> Awaitable[GenerationResult]: ...


class Watcher:
    """The background tasks of one client: watchers of abandoned tasks, the creates they
    wait for, and the kept ends of the tasks they watched."""

    def __init__(self, poll: _Poll, budget: Budget, timeout: float | None) -> None:
        self._poll = poll
        self._budget = budget
        #: How long an abandoned task is watched (``PollPolicy.timeout``).
        self._timeout = timeout
        #: Background watchers of abandoned tasks (and the creates they wait for).
        self.background: set[asyncio.Task[Any]] = set()
        #: The watcher of each watched task, by task id (``wait`` joins it).
        self.watches: dict[str, asyncio.Task[Any]] = {}
        #: Ends of watched tasks (result or TaskFailedError), the latest _KEPT_RESULTS.
        self.kept: OrderedDict[str, GenerationResult | TaskFailedError] = OrderedDict()
        #: Set when the client closes: ``aclose`` ends everything, nothing new is watched.
        self.closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, held until it ends (``aclose`` cancels it)."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def watch(
        self, job: _Job, task: Task | None, create: asyncio.Task[Task] | None, why: str
    ) -> None:
        """Hand an abandoned task (or its create still in flight) and the job's slot to a
        background watcher (none once the client is closing: ``aclose`` ends everything)."""
        if self.closed:
            return
        job.handed_over = True
        job.lifecycle.abandoned = True  # from now on a refused create is not sent again
        watcher = self.spawn(self._watch_until_end(job, task, create, why))
        if task is not None:
            self.watches[task.id] = watcher

    def stop(self) -> list[asyncio.Task[Any]]:
        """Stop watching (the client closes): cancel the background tasks, return them."""
        self.closed = True
        watchers = [task for task in self.background if not task.done()]
        if self.watches:
            logger.warning(
                "closing the client stops watching %d task(s) still running at the service: %s",
                len(self.watches),
                ", ".join(sorted(self.watches)),
            )
        for task in watchers:
            task.cancel()
        return watchers

    def forget(self) -> None:
        """Drop every watcher (a new event loop: the old loop's tasks are dead)."""
        self.background.clear()
        self.watches.clear()

    async def kept_end(self, task_id: str, deadline_s: float | None) -> GenerationResult | None:
        """The end of a task this client watches: join its watcher (up to ``deadline_s``),
        then return the kept result or raise its :class:`TaskFailedError`; ``None`` for a
        task not watched here (``wait`` polls it)."""
        watcher = self.watches.get(task_id)
        if watcher is not None:
            await asyncio.wait([watcher], timeout=deadline_s)
            if task_id not in self.kept and not watcher.done():
                raise TaskTimeoutError(task_id, float(deadline_s or 0))
        kept = self.kept.get(task_id)
        if isinstance(kept, TaskFailedError):
            raise TaskFailedError(kept.task_id, kept.code, kept.message)
        return kept

    async def _watch_until_end(
        self, job: _Job, task: Task | None, create: asyncio.Task[Task] | None, why: str
    ) -> None:
        """Poll an abandoned task at the poll policy's pace until the service reports its
        end (at most ``PollPolicy.timeout``); keep its end for ``wait``; free the slot."""
        lifecycle = job.lifecycle
        try:
            if task is None:
                assert create is not None
                try:
                    task = await create
                except asyncio.CancelledError:
                    logger.warning(
                        "stopped waiting for the create of a cancelled job; a task may exist "
                        "(X-Request-Id %s)",
                        lifecycle.request_id,
                    )
                    raise
                except BaseException as exc:
                    lifecycle.stamp(exc)
                    if lifecycle.task_may_exist:
                        logger.warning(
                            "the create of a cancelled job failed (%s); a task may exist "
                            "(X-Request-Id %s)",
                            str(exc),
                            lifecycle.request_id,
                        )
                    return
                lifecycle.created(task.id)
                self.watches[task.id] = asyncio.current_task()  # type: ignore[assignment]
            logger.warning(
                "task %s is still running at the service after its job %s: watched until it "
                "ends, holding its job slot; client.wait(%r) returns its result",
                task.id,
                why,
                task.id,
            )
            loop = asyncio.get_running_loop()
            try:
                result = await self._poll(task, started=loop.time(), timeout=self._timeout)
            except TaskFailedError as exc:
                lifecycle.ended(failed=True)
                self.keep(task.id, exc)
            except DreamOError as exc:
                logger.warning("stopped watching task %s: %s", task.id, str(exc))
            else:
                lifecycle.ended(failed=False)
                self.keep(task.id, result)
                logger.info("watched task %s ended: its result is kept for wait()", task.id)
        finally:
            if task is not None:
                self.watches.pop(task.id, None)
            await job.release_slot()

    def keep(self, task_id: str, end: GenerationResult | TaskFailedError) -> None:
        """Keep the end of a watched task for ``wait``, and settle what it reserved."""
        if isinstance(end, TaskFailedError):
            self._budget.task_ended(task_id, error=end)
            # Kept without its traceback: the frames it holds would outlive the job.
            end = TaskFailedError(end.task_id, end.code, end.message)
        else:
            self._budget.task_ended(task_id, result=end)
        self.kept[task_id] = end
        while len(self.kept) > _KEPT_RESULTS:
            self.kept.popitem(last=False)
