"""Job tracking: the current asyncio task registered as a job of a client, its money
state, and (for jobs that create a task) its job slot.

``aclose`` ends the registered jobs; each error that leaves a job is stamped with the
job's money state (:class:`~dreamo_async.lifecycle.JobLifecycle`).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .errors import (
    ClientClosedError,
    CreateOutcomeUnknownError,
    DreamOError,
    MoneyState,
    TaskFailedError,
)
from .lifecycle import JobLifecycle

if TYPE_CHECKING:
    from .client import DreamOClient


class _JobState(JobLifecycle):
    """A job's lifecycle, plus the client's rule for jobs abandoned by their caller."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        super().__init__()
        #: The job's caller is gone: a refused create must not be sent again.
        self.abandoned = False

    def sending(self, request_id: str) -> None:
        if self.abandoned and self.state is MoneyState.NOT_SENT:
            raise _CreateAbandoned(request_id)
        super().sending(request_id)


class _CreateAbandoned(Exception):
    """A retry of the create of a cancelled job: nothing was created, nothing is sent."""


class _Tracker:
    """Registers the current asyncio task as a job, so ``aclose`` can end it, and stamps
    every error that leaves the job with its money state (:class:`JobLifecycle`).

    A job ended by ``aclose`` raises :class:`ClientClosedError` (or
    :class:`CreateOutcomeUnknownError` if its create was in flight) instead of
    ``CancelledError``: its caller did not ask for the cancellation. ``aclose`` says so
    with :attr:`closed_by_client`, not with a message to match.
    """

    __slots__ = ("_client", "_task", "closed_by_client", "lifecycle")

    def __init__(self, client: DreamOClient) -> None:
        self._client = client
        self._task: asyncio.Task[Any] | None = None
        #: The job's money state and ids, moved by the client and the transport.
        self.lifecycle = _JobState()
        #: Set by ``aclose`` before it cancels the job.
        self.closed_by_client = False

    def __enter__(self) -> Self:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._client._jobs[self._task] = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is not None:
            self._client._jobs.pop(task, None)
        if exc is None:
            return
        lifecycle = self.lifecycle
        if isinstance(exc, asyncio.CancelledError):
            if self.closed_by_client and task is not None and task.uncancel() == 0:
                raise self._closed_error() from exc
            return
        if isinstance(exc, TaskFailedError):
            lifecycle.ended(failed=True)
        if isinstance(exc, DreamOError):
            lifecycle.stamp(exc)
            return
        if isinstance(exc, Exception) and lifecycle.task_may_exist:
            # A bug or an unforeseen answer after the body may have left: never a bare
            # exception that reads as "nothing happened".
            error: DreamOError
            if lifecycle.task_id is None:
                error = CreateOutcomeUnknownError(
                    f"the create failed unexpectedly ({type(exc).__name__}: {exc})",
                    request_id=lifecycle.request_id,
                )
            else:
                error = DreamOError(
                    f"task {lifecycle.task_id} exists, but its job failed unexpectedly "
                    f"({type(exc).__name__}: {exc}); resume it with wait()"
                )
            lifecycle.stamp(error)
            raise error from exc

    def _closed_error(self) -> DreamOError:
        """What a job ended by ``aclose`` raises, from where its money stands."""
        lifecycle = self.lifecycle
        error: DreamOError
        if lifecycle.task_id is not None:
            error = ClientClosedError(
                f"the client was closed while this job was running (task {lifecycle.task_id} "
                "exists: resume it with wait() on a new client)"
            )
        elif lifecycle.task_may_exist:
            error = CreateOutcomeUnknownError(
                "the client was closed while the create request was in flight",
                request_id=lifecycle.request_id,
            )
        else:
            error = ClientClosedError(
                "the client was closed while this job was waiting; nothing was sent"
            )
        lifecycle.stamp(error)
        return error


class _Job(_Tracker):
    """A tracked job that also holds a job slot while it runs (``async with``).

    A job that hands its task to a watcher (:attr:`handed_over`) leaves the slot to it.
    """

    __slots__ = ("_token", "handed_over")

    def __init__(self, client: DreamOClient) -> None:
        super().__init__(client)
        self._token: object = None
        self.handed_over = False

    async def __aenter__(self) -> _Job:
        client = self._client
        client._check_open()
        # Registered before waiting for a slot: aclose() also ends jobs still queued.
        self.__enter__()
        local = client._local_slots
        if local is not None and local.try_acquire():
            return self  # a free in-process slot: no coroutine
        try:
            self._token = await client._slots.acquire()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def release_slot(self) -> None:
        local = self._client._local_slots
        if local is not None:
            local.release_nowait()
        else:
            # JobSlots.release completes even when this job is being cancelled.
            await self._client._slots.release(self._token)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.handed_over:
                await self.release_slot()
        finally:
            self.__exit__(exc_type, exc, tb)
