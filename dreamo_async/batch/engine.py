"""The run engine of a batch: every state change journalled, so that no result is lost and no
task is paid twice.

Every job's state is written to the journal the moment it changes::

    queued ──► sending ──► created ──► completed   (result JSON, downloaded files)
                  │           │
                  │           └──────► failed      (the task failed at the service)
                  └──► unknown                     (the create may have made a task)
    queued ──► failed                              (refused before any task existed)

How a job that ended by an error is journalled is decided in one place, from its money
state (:func:`job_outcome`, :func:`journal_state`), never from the error's class: any
exception, of any type, ends its job alone; once the create left and nothing proves the
service refused it, the job is ``unknown`` (a client closed mid-create, a bug reading
the answer); once a task exists, it stays ``created`` unless the service said it failed.

* ``sending`` is written, durably, *before* the create request leaves (the
  client's ``before_send`` hook), with the ``X-Request-Id`` it carries. A crash
  between that moment and ``created`` leaves the job in ``sending``: a task may
  exist, and nobody knows its id.
* ``created`` (with the task id) is written right after the create call returns,
  before the first poll.

Re-running with the same journal resumes: ``completed`` jobs are skipped (their
files are checked, and fetched again from the task if missing or not an image), ``created`` jobs
are polled (never created again), ``sending``/``unknown`` jobs are *reported*, not
re-sent (``retry_unknown=True`` re-sends them: the user's decision, as it may
pay twice), jobs that failed before a task existed run again (nothing was paid),
jobs whose task failed at the service stay failed unless ``retry_failed=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from ..bulk import BatchProgress, JobWindow
from ..download import download_result, is_saved_image, remove_stale_parts
from ..errors import (
    SERVICE_ERRORS,
    APIConnectionError,
    AuthenticationError,
    BudgetExceededError,
    DreamOError,
    JournalError,
    MoneyState,
    NotFoundError,
    TaskFailedError,
    TaskTimeoutError,
)
from ..lifecycle import JobLifecycle
from ..models import Task
from .jobs import BatchJob, JobState
from .journal import JobRow, Journal
from .results import result_json, write_results

if TYPE_CHECKING:
    from ..client import DreamOClient
    from ..models import GenerationResult

__all__ = [
    "BatchEvent",
    "BatchReport",
    "BatchState",
    "JobOutcome",
    "job_outcome",
    "journal_state",
    "run_batch",
]

logger = logging.getLogger("dreamo_async")


#: The old name of the progress a batch event carries (one vocabulary with ``generate_many``).
BatchState = BatchProgress


@attrs.frozen
class BatchEvent:
    """Something happened to one job; ``kind`` is one of ``created``, ``polled``,
    ``completed``, ``failed``, ``unknown``, ``skipped``."""

    kind: str
    index: int
    #: The run's progress when it happened: ``done`` counts every job ended (completed,
    #: failed, skipped), as ``generate_many`` counts.
    state: BatchProgress
    task_id: str | None = None
    files: tuple[str, ...] = ()
    code: str | None = None
    message: str | None = None
    task: Task | None = None


@attrs.frozen
class BatchReport:
    """The outcome of :func:`run_batch` (this run plus what the journal held before)."""

    total: int
    completed: int
    #: Completed in earlier runs (skipped now).
    skipped: int
    #: Failed jobs by error code (provider code, ``timeout``, ``download``...).
    failed: Mapping[str, int]
    #: Jobs whose create outcome is unknown: job index -> ``X-Request-Id``.
    unknown: Mapping[int, str | None]
    cost: Decimal
    wall_time: float
    results_path: Path | None = None
    #: The error that stopped the run early (auth failed, service unreachable).
    fatal: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.completed == self.total and self.fatal is None


class _Stop(Exception):
    """Raised inside a job when the run is stopping (a fatal error elsewhere)."""


class _RunJournalError(JournalError):
    """The journal failed once the jobs had started: requests may have been sent.

    Private: it only lets the CLI tell this from a journal refused up front
    (locked, unopenable, written for other jobs), which is an input error.
    """


async def run_batch(
    client: DreamOClient,
    jobs: Iterable[BatchJob | Mapping[str, Any]],
    journal: Journal | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    concurrency: int | None = None,
    retry_unknown: bool = False,
    retry_failed: bool = False,
    timeout: float | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
    results_name: str | None = "results.jsonl",
) -> BatchReport:
    """Run ``jobs`` through ``client`` with every state change journalled; resumable.

    ``jobs`` are :class:`BatchJob` (from :func:`load_jobs`) or plain mappings of
    ``generate`` keywords (indexed in order). Results are saved in ``out_dir`` as
    ``{index:05d}-{task_id}-{n}.{ext}``; ``results.jsonl`` there lists every job
    (``results_name`` names it otherwise; ``None``: no such file, the journal has all).
    ``concurrency`` (default ``client.max_concurrency``) jobs create-and-poll at
    once; downloads overlap with the next jobs. See the module docstring for
    what resuming does with each state.
    """
    batch = [_as_job(i, job) for i, job in enumerate(jobs)]
    out = Path(out_dir)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    own = not isinstance(journal, Journal)
    opened = journal if isinstance(journal, Journal) else Journal(journal)
    try:
        if own:  # SQLite connect, WAL pragma, schema write with fsync: off the event loop
            await anyio.to_thread.run_sync(opened.open)
        engine = _Engine(
            client,
            opened,
            out,
            concurrency=concurrency or client.max_concurrency,
            timeout=timeout,
            on_event=on_event,
        )
        try:
            report = await engine.run(batch, retry_unknown=retry_unknown, retry_failed=retry_failed)
            if results_name is not None:
                path = out / results_name
                await asyncio.to_thread(write_results, await asyncio.to_thread(opened.rows), path)
                report = attrs.evolve(report, results_path=path)
        except JournalError as exc:
            if not engine.started or isinstance(exc, _RunJournalError):
                raise
            raise _RunJournalError(str(exc)) from exc
        return report
    finally:
        if own:  # joins the writer thread; not abandoned if cancelled, so the lock is freed
            await anyio.to_thread.run_sync(opened.close)


def _as_job(index: int, job: BatchJob | Mapping[str, Any]) -> BatchJob:
    if isinstance(job, BatchJob):
        return job
    return BatchJob(index=index, params=dict(job), line=index + 1)


class _Engine:
    """One run: a pool of create-and-poll workers feeding bounded background downloads."""

    def __init__(
        self,
        client: DreamOClient,
        journal: Journal,
        out: Path,
        *,
        concurrency: int,
        timeout: float | None,
        on_event: Callable[[BatchEvent], None] | None,
    ) -> None:
        self.client = client
        self.journal = journal
        self.out = out
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.on_event = on_event
        #: Jobs in the run; completed ones (this run's and skipped ones; failed ones are
        #: counted in ``failed``, by code); jobs to run this time; what the completed cost.
        self.total = self.completed = self.skipped = self.to_run = 0
        self.cost = Decimal(0)
        self.window: JobWindow[tuple[BatchJob, JobRow], tuple[BatchJob, JobRow], None] | None
        self.window = None
        self.failed: Counter[str] = Counter()
        self.unknown: dict[int, str | None] = {}
        self.fatal: BaseException | None = None
        self.downloads: set[asyncio.Task[None]] = set()
        #: Whether the workers started (requests may have been sent since).
        self.started = False
        self.download_slots = asyncio.Semaphore(2 * self.concurrency)

    def emit(self, kind: str, index: int, **details: Any) -> None:
        """Tell ``on_event``; a failing callback is logged, it never ends a job or the run
        (a broken progress display must not cost a paid result)."""
        if self.on_event is not None:
            try:
                self.on_event(BatchEvent(kind, index, self.progress(), **details))
            except Exception:
                logger.exception("the batch on_event callback failed on a %r event", kind)

    def progress(self) -> BatchProgress:
        """The run's progress now, in the words of ``generate_many``'s."""
        window = self.window
        failed = sum(self.failed.values())  # every failed job is counted once by its code
        return BatchProgress(
            done=self.completed + failed,
            failed=failed,
            total=self.total,
            cost=self.cost,
            running=0 if window is None else window.active,
            queued=self.to_run - (0 if window is None else window.read),
            skipped=self.skipped,
        )

    async def run(
        self, jobs: Sequence[BatchJob], *, retry_unknown: bool, retry_failed: bool
    ) -> BatchReport:
        rows = await asyncio.to_thread(self.journal.sync_jobs, jobs)
        present = await asyncio.to_thread(_existing_files, rows.values(), self.out)
        await asyncio.to_thread(remove_stale_parts, self.out)
        self.total = len(jobs)
        work: list[tuple[BatchJob, JobRow]] = []
        cost = Decimal(0)
        for job in jobs:
            row = rows[job.index]
            if row.state == "completed" and row.index in present:
                self.skipped += 1
                self.completed += 1
                cost += row.cost or 0
                files = tuple(str(self.out / f) for f in row.files)
                self.emit("skipped", job.index, task_id=row.task_id, files=files)
            elif row.state in ("sending", "unknown") and not retry_unknown:
                self._count_unknown(job.index, row.request_id, row.error_message)
            elif row.state == "failed" and row.task_id is not None and not retry_failed:
                self._fail(job.index, row.error_code, row.error_message, row.task_id)
            else:
                work.append((job, row))
        self.cost = cost
        # Created tasks first: they are already paid for and their URLs may expire.
        work.sort(key=lambda item: (item[1].state not in ("created", "completed"), item[0].index))
        self.to_run = len(work)
        started = time.monotonic()
        self.started = True
        # The bulk path's window: ``concurrency`` jobs create-and-poll at once, the next
        # taken from ``work`` as one ends; their downloads go on in the background.
        window = self.window = JobWindow(self._feed(work), self._run_job, self.concurrency)
        try:
            while True:
                while (taken := window.take()) is not None:
                    window.start(*taken)
                if not window.running:
                    break
                for _, _, task in await window.finished():
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        raise exc  # the journal failed: the run stops (see _job)
            # Every download to its end; a journal failure (the only error a download
            # raises) stops the run. Ended downloads are dropped here, not only by their
            # done callbacks: one left in the set made a gather loop spin (CPython 3.12.1).
            while self.downloads:
                ended, _ = await asyncio.wait(self.downloads, return_when=asyncio.FIRST_EXCEPTION)
                self.downloads -= ended
                for task in ended:
                    task.result()
        finally:
            await window.aclose()
            for task in self.downloads:
                task.cancel()
            await asyncio.gather(*self.downloads, return_exceptions=True)
        return BatchReport(
            total=len(jobs),
            completed=self.completed,
            skipped=self.skipped,
            failed=dict(self.failed),
            unknown=dict(self.unknown),
            cost=self.cost,
            wall_time=time.monotonic() - started,
            fatal=self.fatal,
        )

    def _feed(
        self, work: Iterable[tuple[BatchJob, JobRow]]
    ) -> Iterator[tuple[int, tuple[BatchJob, JobRow]]]:
        """The jobs to run, until a fatal error stops the run (no new job starts)."""
        for job, row in work:
            if self.fatal is not None:
                return
            yield job.index, (job, row)

    async def _run_job(self, item: tuple[BatchJob, JobRow]) -> None:
        with contextlib.suppress(_Stop):  # the run is stopping: this job ended as journalled
            await self._job(*item)

    def _fail(
        self, index: int, code: str | None, message: str | None, task_id: str | None = None
    ) -> None:
        """Count a failed job (under ``failed`` if it has no code) and emit ``failed``."""
        self.failed[code or "failed"] += 1
        self.emit("failed", index, task_id=task_id, code=code, message=message)

    def _count_unknown(self, index: int, request_id: str | None, message: str | None) -> None:
        """Count a job whose create outcome is unknown and emit ``unknown``."""
        self.unknown[index] = request_id
        self.failed["unknown"] += 1
        self.emit("unknown", index, code="unknown", message=message)

    def _stop_if_fatal(self, exc: BaseException) -> None:
        """Stop the run (raise :class:`_Stop`) if ``exc`` means the service cannot be used."""
        if isinstance(exc, SERVICE_ERRORS):
            self.fatal = self.fatal or exc
            raise _Stop from None

    async def _write(self, index: int, state: JobState, **fields: Any) -> None:
        """Journal a change; a failed write ends the run (the journal is what keeps the
        money safe), never just its job."""
        try:
            await self.journal.aupdate(index, state, **fields)
        except Exception as exc:
            raise _RunJournalError(str(exc)) from exc

    async def _end(
        self, index: int, exc: BaseException, job: JobLifecycle, *, phase: str | None = None
    ) -> None:
        """Journal, count and report a job ended by ``exc``, from its money state.

        Every way a job can end goes through here (a refusal, a lost answer, a timeout,
        a failed task, a download error, a bug), so the next run does with it what its
        money state allows: poll a known task, report a create that may have made one,
        run again a job that sent nothing. ``phase`` labels errors of one step
        (``"invalid"``, ``"download"``) whatever their kind.
        """
        outcome = job_outcome(exc, job)
        state = journal_state(outcome.money_state, task_id=outcome.task_id)
        if state == "failed" and outcome.task_id is None and isinstance(exc, BudgetExceededError):
            state = "queued"  # stopped by the cap, nothing sent: a re-run with room sends it
        message = _message_of(exc, outcome.money_state)
        if state == "unknown":
            await self._write(
                index,
                "unknown",
                request_id=outcome.request_id,
                error_code="unknown",
                error_message=message,
            )
            self._count_unknown(index, outcome.request_id, message)
        else:
            code = phase or _code_of(exc)
            ids = {"task_id": outcome.task_id} if outcome.task_id is not None else {}
            await self._write(index, state, error_code=code, error_message=message, **ids)
            self._fail(index, code, message, outcome.task_id)
        if not isinstance(exc, DreamOError):  # a bug (ours or a dependency's): keep its trace
            logger.error("batch job %d ended by an unexpected error", index, exc_info=exc)
        self._stop_if_fatal(exc)

    async def _job(self, job: BatchJob, row: JobRow) -> None:
        """One job from its journal row to a result handed to the downloads; any error
        (of any type) ends this job alone, journalled by :meth:`_end`."""
        life = _BatchLifecycle()
        if row.state in ("created", "completed") and row.task_id is not None:
            life.created(row.task_id)
        try:
            await self._create_and_poll(job, life)
        except (_Stop, _RunJournalError):
            raise
        except Exception as exc:
            await self._end(job.index, exc, life, phase="invalid" if life.invalid else None)

    async def _create_and_poll(self, job: BatchJob, life: _BatchLifecycle) -> None:
        client, index = self.client, job.index
        created: Task | None = None
        if life.task_id is None:
            try:
                # The request load_jobs checked, onto this client's limits (no check
                # again when they are the same); a plain mapping is checked here.
                request = (
                    client.build_request(**job.params)
                    if job.request is None
                    else client.build_request(job.request)
                )
            except Exception:  # an unknown key (TypeError), a value out of range...
                life.invalid = True
                raise

            async def before_send(request_id: str) -> None:
                await self._write(index, "sending", request_id=request_id, count_create=True)
                life.sending(request_id)  # journalled first: only then may the body leave

            created = await client.submit(request, before_send=before_send)
            life.created(created.id)
            await self._write(
                index, "created", task_id=created.id, error_code=None, error_message=None
            )
            self.emit("created", index, task_id=created.id)
        if self.fatal is not None:
            raise _Stop
        task_id = life.task_id
        assert task_id is not None
        result = await client.wait(
            created or task_id,
            timeout=self.timeout if self.timeout is not None else client.poll_policy.timeout,
            on_poll=lambda t: self.emit("polled", index, task_id=t.id, task=t),
        )
        life.ended(failed=False)
        await self.download_slots.acquire()
        download = asyncio.create_task(self._download(index, result, life))
        self.downloads.add(download)
        download.add_done_callback(self.downloads.discard)

    async def _download(self, index: int, result: GenerationResult, life: JobLifecycle) -> None:
        try:
            try:
                saved = await download_result(self.client, result, self.out, index)
            except _RunJournalError:
                raise
            except Exception as exc:  # OSError: disk full, read-only, permission; or a bug
                # The task is done and paid: it stays "created" so a re-run fetches it again.
                await self._end(index, exc, life, phase="download")
                return
            files = [path.name for path in saved]
            await self._write(
                index,
                "completed",
                result=json.dumps(result_json(result), sort_keys=True),
                files=json.dumps(files),
                cost=None if result.cost is None else str(result.cost),
                error_code=None,
                error_message=None,
            )
            self.completed += 1
            self.cost += result.cost or 0
            paths = tuple(str(self.out / f) for f in files)
            self.emit("completed", index, task_id=result.task_id, files=paths)
        finally:
            self.download_slots.release()


class _BatchLifecycle(JobLifecycle):
    """A job's lifecycle as the engine sees it, and whether its parameters were refused."""

    __slots__ = ("invalid",)

    def __init__(self) -> None:
        super().__init__()
        self.invalid = False


@attrs.frozen
class JobOutcome:
    """Where a job's money stood when an error ended it: what :func:`journal_state` reads."""

    money_state: MoneyState
    task_id: str | None
    request_id: str | None


def job_outcome(error: BaseException, job: JobLifecycle) -> JobOutcome:
    """The money state of a job ended by ``error``: the error's own, completed by ``job``.

    ``job`` is what the engine itself saw (the ``X-Request-Id`` it journalled as
    ``sending``, the task id it holds). An error of any type may end a job; one that
    carries no money state, or says "not sent" about another request than the one
    that left, cannot prove that a create which left made nothing: its outcome is
    unknown. A task id, from either side, means a task exists.
    """
    state: MoneyState = getattr(error, "money_state", MoneyState.NOT_SENT)
    task_id: str | None = getattr(error, "task_id", None) or job.task_id
    request_id: str | None = getattr(error, "request_id", None)
    if (
        job.state is MoneyState.SENDING
        and state is MoneyState.NOT_SENT
        and request_id != job.request_id
    ):
        state = MoneyState.OUTCOME_UNKNOWN
    if getattr(error, "status", None) == 404 and task_id is not None:
        # A poll answered that the task does not exist: its end, as far as anyone can tell.
        state = MoneyState.FAILED
    return JobOutcome(state, task_id, request_id or job.request_id)


def journal_state(state: MoneyState, *, task_id: str | None) -> JobState:
    """The journal state of a job that ended in money ``state``: what the next run does.

    ``failed`` with a task: the task failed at the service, it stays failed (unless
    ``retry_failed``). Any other known task: ``created``, polled (and fetched) again,
    never created again. No task id but a create that may have made one: ``unknown``,
    reported and never re-sent (unless ``retry_unknown``). Nothing sent: ``failed``,
    run again (nothing was paid).
    """
    if state is MoneyState.FAILED:
        return "failed"
    if task_id is not None:
        return "created"
    if state is MoneyState.NOT_SENT:
        return "failed"
    return "unknown"


def _existing_files(rows: Iterable[JobRow], out: Path) -> set[int]:
    """Indexes of completed jobs whose every image is still on disk (and still an image)."""
    return {
        row.index
        for row in rows
        if row.state == "completed" and all(is_saved_image(out / f) for f in row.files)
    }


#: Labels of errors in reports and the journal's ``error_code``: what kind of error, for
#: people. What the next run does with the job is read from its money state instead.
_LABELS: Final = (
    (BudgetExceededError, "budget"),
    (TaskTimeoutError, "timeout"),
    (NotFoundError, "not_found"),
    (AuthenticationError, "auth"),
    (APIConnectionError, "unreachable"),
)


def _code_of(exc: BaseException) -> str:
    for kind, label in _LABELS:
        if isinstance(exc, kind):
            return label
    if code := getattr(exc, "code", None):
        return str(code)
    return "failed" if isinstance(exc, TaskFailedError) else type(exc).__name__


def _message_of(exc: BaseException, state: MoneyState) -> str:
    """The text journalled and reported for a job ended by ``exc``."""
    if isinstance(exc, TaskFailedError) and exc.message:
        return exc.message
    text = str(exc) if isinstance(exc, DreamOError) else f"{type(exc).__name__}: {exc}"
    if state in (MoneyState.SENDING, MoneyState.OUTCOME_UNKNOWN) and "a task may" not in text:
        text += "; the create request had left, a task may have been created: not re-sent"
    return text
