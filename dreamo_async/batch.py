"""Resumable bulk runs: a SQLite journal so that no result is lost and no task is paid twice.

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

The journal has one writer: a dedicated thread owns the SQLite connection
(WAL mode, ``synchronous=FULL``), takes every write queued while it was busy
and commits them as one transaction (a group commit), so a hundred concurrent
jobs share one fsync instead of queueing for a hundred. A lock file
(``<journal>.lock``, ``flock``) stops two runs from sharing a journal; the OS
drops it when the process dies, even on SIGKILL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar

import anyio
import attrs

from .download import download_result, fsync_directory, is_saved_image, remove_stale_parts
from .errors import (
    SERVICE_ERRORS,
    APIConnectionError,
    AuthenticationError,
    BudgetExceededError,
    DreamOError,
    InvalidRequestError,
    JobsFileError,
    JournalError,
    MoneyState,
    NotFoundError,
    TaskFailedError,
    TaskTimeoutError,
)
from .images import ImageSource, check_local_image, classify_images
from .lifecycle import JobLifecycle
from .limits import DEFAULT_LIMITS, Limits
from .models import Task
from .request import GenerationRequest

if TYPE_CHECKING:
    from .client import DreamOClient
    from .models import GenerationResult

__all__ = [
    "JOB_KEYS",
    "BatchEvent",
    "BatchJob",
    "BatchReport",
    "BatchState",
    "JobOutcome",
    "JobRow",
    "JobState",
    "JobsFileError",
    "Journal",
    "JournalError",
    "job_outcome",
    "journal_state",
    "load_jobs",
    "run_batch",
    "write_results",
]

_T = TypeVar("_T")
logger = logging.getLogger("dreamo_async")

JobState = Literal["queued", "sending", "created", "completed", "failed", "unknown"]
#: The keys a job line may have: the keywords of ``generate`` (``GenerationRequest``'s
#: fields, so a new parameter is accepted here the day it is added there), but not
#: ``limits``, which is the client's.
JOB_KEYS: Final = frozenset(field.name for field in attrs.fields(GenerationRequest)) - {"limits"}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY,
    line INTEGER NOT NULL,
    digest TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN
        ('queued', 'sending', 'created', 'completed', 'failed', 'unknown')),
    request_id TEXT,
    task_id TEXT,
    result TEXT,
    files TEXT,
    cost TEXT,
    error_code TEXT,
    error_message TEXT,
    creates INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
"""
_SCHEMA_VERSION: Final = "1"
_MAX_GROUP: Final = 1024


# --------------------------------------------------------------------------- jobs


@attrs.frozen
class BatchJob:
    """One job of a batch: its position, where it came from, and its parameters.

    ``params`` are the keywords of ``generate`` as JSON values, image paths
    already absolute; ``digest`` fingerprints them so that a journal is never
    resumed against a changed job.
    """

    index: int
    params: Mapping[str, Any]
    line: int = 0
    source: str = "<jobs>"

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.params, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_jobs(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> list[BatchJob]:
    """Read and check a whole JSON-lines jobs file before anything is sent.

    One JSON object per line, with the keywords of ``generate``; blank lines are
    skipped; relative image paths resolve against the file's folder. Every
    problem is collected (malformed JSON, unknown key, missing or unusable
    image, out-of-range value) and raised together as :class:`JobsFileError`,
    each as ``file:line: message``.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobsFileError([f"{file}: cannot read the jobs file: {exc}"]) from None
    base = file.resolve().parent
    jobs: list[BatchJob] = []
    problems: list[str] = []
    #: Image files already read and found fine (a file used by many jobs is read once).
    checked: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{file}:{number}"
        try:
            params = _check_line(raw, base, limits, checked)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        jobs.append(BatchJob(index=len(jobs), params=params, line=number, source=str(file)))
    if problems:
        raise JobsFileError(problems)
    if not jobs:
        raise JobsFileError([f"{file}: no jobs (one JSON object per line expected)"])
    return jobs


def _check_line(raw: str, base: Path, limits: Limits, checked: set[str]) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if unknown := sorted(set(data) - JOB_KEYS):
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(JOB_KEYS))}"
        )
    for key in ("prompt", "images"):
        if key not in data:
            raise ValueError(f"missing {key!r}")
    for key, value in data.items():
        if key != "images":  # local paths are never sent; URLs are checked below
            _check_sendable(key, value)
    images = data["images"]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError("'images' must be a list of paths or URLs (strings)")
    try:
        sources = classify_images(images)  # refuses ftp://, file://, empty paths, ...
    except InvalidRequestError as exc:
        raise ValueError(str(exc)) from None
    for n, source in enumerate(sources):
        if source.kind != "path":
            _check_sendable(f"images[{n}]", source.value)
    sources = tuple(_resolve(source, base) for source in sources)
    params = {**data, "images": [str(source.value) for source in sources]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # advisories are for the run, not for input errors
            GenerationRequest(limits=limits, **{**params, "images": sources})  # kept as they are
    except (InvalidRequestError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    for source in sources:
        # Only files that passed are remembered: a failure is rare, and its message
        # names the image's position in this line, which differs between lines.
        if source.kind == "path" and (path := str(source.value)) not in checked:
            _check_image_file(source, limits)
            checked.add(path)
    return params


def _check_sendable(key: str, value: object) -> None:
    """Refuse text that cannot be encoded for the wire (a lone surrogate such as
    ``"\\ud800"`` is valid JSON but not UTF-8), before anything is sent."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            raise ValueError(
                f"{key!r} cannot be sent: it holds a lone surrogate {char!r} at position "
                f"{exc.start} (not valid Unicode text)"
            ) from None
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _check_sendable(f"{key}[{n}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_sendable(f"{key}.{name}", item)


def _resolve(source: ImageSource, base: Path) -> ImageSource:
    """A path source made absolute against the jobs file's folder; any other source as is."""
    if source.kind != "path":
        return source
    path = Path(str(source.value)).expanduser()
    return attrs.evolve(source, value=str(path if path.is_absolute() else base / path))


def _check_image_file(source: ImageSource, limits: Limits) -> None:
    """Read and check a local image the way a run will; a problem is a ``ValueError``
    with the library's own message."""
    try:
        check_local_image(source, limits)
    except InvalidRequestError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------- journal


@attrs.frozen
class JobRow:
    """One job as the journal holds it."""

    index: int
    line: int
    digest: str
    spec: Mapping[str, Any]
    state: JobState
    request_id: str | None = None
    task_id: str | None = None
    result: Mapping[str, Any] | None = None
    #: The saved images, as names relative to the output folder.
    files: tuple[str, ...] = ()
    cost: Decimal | None = None
    error_code: str | None = None
    error_message: str | None = None
    #: Create requests sent for this job over all runs (1 unless retried on purpose).
    creates: int = 0


_COLUMNS: Final = (
    "idx, line, digest, spec, state, request_id, task_id, result, files, cost, "
    "error_code, error_message, creates"
)


def _row(values: Sequence[Any]) -> JobRow:
    (idx, line, digest, spec, state, rid, tid, result, files, cost, code, msg, creates) = values
    return JobRow(
        index=idx,
        line=line,
        digest=digest,
        spec=json.loads(spec),
        state=state,
        request_id=rid,
        task_id=tid,
        result=json.loads(result) if result else None,
        files=tuple(json.loads(files)) if files else (),
        cost=Decimal(cost) if cost else None,
        error_code=code,
        error_message=msg,
        creates=creates,
    )


_STOP: Final = object()
#: When a write is fsynced before it counts as done (see :class:`Journal`).
Fsync = Literal["all", "critical", "none"]


@attrs.define(slots=True)
class _Op:
    """One queued call: its function, whether it must be fsynced, who waits for it."""

    fn: Callable[[sqlite3.Connection], Any]
    sync: bool
    #: A blocking caller's future, or None for an asyncio caller.
    future: concurrent.futures.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[Any] | None = None


@attrs.define
class JournalStats:
    """What the writer did: operations, and the transactions they shared."""

    operations: int = 0
    commits: int = 0
    #: Commits made with ``synchronous=FULL`` (each one fsync of the WAL).
    synced_commits: int = 0
    largest_group: int = 0


class Journal:
    """The SQLite journal of a batch, written by one thread with group commits.

    ``with Journal(path) as journal:`` opens it (and takes its lock); every
    method may be called from any thread; the ``a*`` methods are awaitable.

    Every commit survives a crash of this process (WAL). ``fsync`` decides what
    also survives a power cut before it counts as done: ``"critical"`` (default)
    fsyncs the groups holding a ``sending`` or ``created`` write, the two whose
    loss could cost money or a task id; a lost ``completed``/``failed`` write only
    makes the next run poll (free) again. ``"all"`` fsyncs every group,
    ``"none"`` none (benchmarks compare them).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: Fsync = "critical") -> None:
        if fsync not in ("all", "critical", "none"):
            raise ValueError(f"fsync must be 'all', 'critical' or 'none', got {fsync!r}")
        self.path = Path(path)
        self.fsync: Fsync = fsync
        self.stats = JournalStats()
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> Self:
        """Take the lock, start the writer thread, create the schema."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.path.with_name(self.path.name + ".lock"))
        self._thread = threading.Thread(target=self._writer, name="dreamo-journal", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._release()
            raise JournalError(f"cannot open the journal {self.path}: {self._failure}")
        return self

    def close(self) -> None:
        """Write everything queued, stop the writer, drop the lock (idempotent)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the writer thread -------------------------------------------------------------

    def _writer(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
        except Exception as exc:  # any: open() waits on _ready and must hear of it
            # Connected but unusable (not a database, read-only...): close it here,
            # or the file stays open for as long as the failure is kept.
            if conn is not None:
                conn.close()
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        synced = True
        try:
            stop = False
            while not stop:
                group: list[_Op] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stop = True
                    else:
                        assert isinstance(item, _Op)
                        group.append(item)
                    if len(group) >= _MAX_GROUP:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if group:
                    sync = self.fsync == "all" or (
                        self.fsync == "critical" and any(op.sync for op in group)
                    )
                    if sync != synced:  # allowed between transactions, per connection
                        conn.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
                        synced = sync
                    self._commit_group(conn, group)
                    self.stats.synced_commits += sync
        finally:
            conn.close()

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Op]) -> None:
        """Run ``group`` in one transaction; resolve the futures only after COMMIT."""
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in group:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op.fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            outcomes = [(False, JournalError(f"journal write failed: {exc}"))] * len(group)
        self.stats.operations += len(group)
        self.stats.commits += 1
        self.stats.largest_group = max(self.stats.largest_group, len(group))
        # Writes run even if their waiter was cancelled: a job cancelled while
        # recording its task id must still leave the id in the journal. Waiters on
        # an event loop are woken with one call per loop and group, not one per write.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for op, (ok, value) in zip(group, outcomes, strict=True):
            if op.future is not None:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    if ok:
                        op.future.set_result(value)
                    else:
                        op.future.set_exception(value)
            elif op.loop is not None and op.waiter is not None:
                by_loop.setdefault(op.loop, []).append((op.waiter, ok, value))
        for loop, waiters in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, waiters)

    # -- calls -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._thread is None:
            raise JournalError("the journal is not open")

    def submit(
        self, fn: Callable[[sqlite3.Connection], _T], *, sync: bool = True
    ) -> concurrent.futures.Future[_T]:
        """Queue ``fn(connection)`` for the writer; its future resolves after the commit."""
        self._check_open()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._queue.put(_Op(fn, sync, future=future))
        return future

    def call(self, fn: Callable[[sqlite3.Connection], _T], *, sync: bool = True) -> _T:
        """Run ``fn`` in the writer and wait (blocking) until it is committed."""
        return self.submit(fn, sync=sync).result()

    async def acall(self, fn: Callable[[sqlite3.Connection], _T], *, sync: bool = True) -> _T:
        """Run ``fn`` in the writer; resume once it is committed (``sync``: and fsynced)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Op(fn, sync, loop=loop, waiter=waiter))
        return await waiter

    # -- job operations ----------------------------------------------------------------

    def sync_jobs(self, jobs: Sequence[BatchJob]) -> dict[int, JobRow]:
        """Insert new jobs as ``queued``; check known ones are unchanged; return all rows."""

        def op(conn: sqlite3.Connection) -> dict[int, JobRow]:
            known: dict[int, str] = dict(conn.execute("SELECT idx, digest FROM jobs"))
            now = time.time()
            fresh = []
            for job in jobs:
                digest = job.digest
                if job.index in known:
                    if known[job.index] != digest:
                        raise JournalError(
                            f"{job.where}: job {job.index} differs from the one in the journal "
                            f"{self.path}; use a new journal (or --journal) for changed jobs"
                        )
                    continue
                spec = json.dumps(dict(job.params), sort_keys=True)
                fresh.append((job.index, job.line, digest, spec, "queued", now))
            conn.executemany(
                "INSERT INTO jobs (idx, line, digest, spec, state, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                fresh,
            )
            return {row.index: row for row in _select(conn)}

        return self.call(op)

    def rows(self) -> list[JobRow]:
        """Every job, in index order."""
        return self.call(_select)

    async def aupdate(
        self, index: int, state: JobState, *, count_create: bool = False, **fields: Any
    ) -> None:
        """Set a job's state (and columns such as ``task_id``); committed when it returns.

        ``count_create`` adds one to the job's ``creates`` (a create request is leaving).
        """
        op = _updater(index, state, fields, count_create=count_create)
        await self.acall(op, sync=state in _CRITICAL)

    def update(
        self, index: int, state: JobState, *, count_create: bool = False, **fields: Any
    ) -> None:
        """Blocking :meth:`aupdate`."""
        op = _updater(index, state, fields, count_create=count_create)
        self.call(op, sync=state in _CRITICAL)


#: States whose loss in a power cut could cost money (``sending``) or a task id (``created``).
_CRITICAL: Final = frozenset({"sending", "created"})


def _wake(waiters: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for waiter, ok, value in waiters:
        if waiter.done():  # cancelled by its caller; the write happened anyway
            continue
        if ok:
            waiter.set_result(value)
        else:
            waiter.set_exception(value)


def _select(conn: sqlite3.Connection) -> list[JobRow]:
    return [_row(v) for v in conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY idx")]


_UPDATABLE: Final = frozenset(
    {"request_id", "task_id", "result", "files", "cost", "error_code", "error_message"}
)


def _updater(
    index: int, state: JobState, fields: Mapping[str, Any], *, count_create: bool
) -> Callable[[sqlite3.Connection], None]:
    if bad := set(fields) - _UPDATABLE:
        raise ValueError(f"unknown journal columns {sorted(bad)}")

    def op(conn: sqlite3.Connection) -> None:
        sets = ["state = ?", "updated = ?", *(f"{k} = ?" for k in fields)]
        if count_create:
            sets.append("creates = creates + 1")
        cursor = conn.execute(
            f"UPDATE jobs SET {', '.join(sets)} WHERE idx = ?",
            (state, time.time(), *fields.values(), index),
        )
        if cursor.rowcount != 1:
            raise JournalError(f"job {index} is not in the journal")

    return op


def _lock(path: Path) -> int:
    """An exclusive, non-blocking ``flock`` on ``path``; raises when another run holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, documented
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JournalError(
            f"the journal {path.with_suffix('')} is in use by another run (lock {path})"
        ) from None
    return fd


# --------------------------------------------------------------------------- the run


@attrs.define
class BatchState:
    """Live counters of a run, updated by the engine and read by progress displays."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    queued: int = 0
    skipped: int = 0
    cost: Decimal = Decimal(0)
    started: float = attrs.field(factory=time.monotonic)


@attrs.frozen
class BatchEvent:
    """Something happened to one job; ``kind`` is one of ``created``, ``polled``,
    ``completed``, ``failed``, ``unknown``, ``skipped``."""

    kind: str
    index: int
    state: BatchState
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
                await asyncio.to_thread(write_results, await opened.acall(_select), path)
                report = attrs.evolve(report, results_path=path)
        except JournalError as exc:
            if not engine.started or isinstance(exc, _RunJournalError):
                raise
            raise _RunJournalError(str(exc)) from exc
        return report
    finally:
        if own:  # joins the writer thread; not abandoned if cancelled, so the lock is freed
            await anyio.to_thread.run_sync(opened.close)


def journal_spending(path: str | os.PathLike[str]) -> tuple[Decimal, Decimal | None, int]:
    """What earlier runs of a journal spent: (reported costs of completed jobs, the highest
    of them or ``None``, jobs that may be billed without a reported cost).

    The last are tasks created and not completed (failed ones included) and creates whose
    outcome is unknown: ``--max-spend`` counts them at the estimate, as the client does.
    Read-only and without the run lock; ``(0, None, 0)`` when there is no journal.
    """
    if not Path(path).exists():
        return Decimal(0), None, 0
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        rows = conn.execute("SELECT state, task_id, cost FROM jobs").fetchall()
    except sqlite3.Error:
        return Decimal(0), None, 0
    finally:
        conn.close()
    costs = [Decimal(c) for state, _, c in rows if state == "completed" and c]
    unpriced = sum(
        1
        for state, task_id, _ in rows
        if state in ("created", "sending", "unknown") or (state == "failed" and task_id)
    )
    return sum(costs, Decimal(0)), max(costs, default=None), unpriced


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
        self.state = BatchState(total=0)
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
                self.on_event(BatchEvent(kind, index, self.state, **details))
            except Exception:
                logger.exception("the batch on_event callback failed on a %r event", kind)

    async def run(
        self, jobs: Sequence[BatchJob], *, retry_unknown: bool, retry_failed: bool
    ) -> BatchReport:
        rows = await asyncio.to_thread(self.journal.sync_jobs, jobs)
        present = await asyncio.to_thread(_existing_files, rows.values(), self.out)
        await asyncio.to_thread(remove_stale_parts, self.out)
        self.state = BatchState(total=len(jobs))
        work: list[tuple[BatchJob, JobRow]] = []
        cost = Decimal(0)
        for job in jobs:
            row = rows[job.index]
            if row.state == "completed" and row.index in present:
                self.state.skipped += 1
                self.state.done += 1
                cost += row.cost or 0
                files = tuple(str(self.out / f) for f in row.files)
                self.emit("skipped", job.index, task_id=row.task_id, files=files)
            elif row.state in ("sending", "unknown") and not retry_unknown:
                self._count_unknown(job.index, row.request_id, row.error_message)
            elif row.state == "failed" and row.task_id is not None and not retry_failed:
                self._fail(job.index, row.error_code, row.error_message, row.task_id)
            else:
                work.append((job, row))
        self.state.cost = cost
        # Created tasks first: they are already paid for and their URLs may expire.
        work.sort(key=lambda item: (item[1].state not in ("created", "completed"), item[0].index))
        self.state.queued = len(work)
        started = time.monotonic()
        feed = iter(work)
        self.started = True
        workers = [asyncio.create_task(self._worker(feed)) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
            while self.downloads:
                await asyncio.gather(*list(self.downloads))
        finally:
            for task in [*workers, *self.downloads]:
                task.cancel()
            await asyncio.gather(*workers, *self.downloads, return_exceptions=True)
        return BatchReport(
            total=len(jobs),
            completed=self.state.done,
            skipped=self.state.skipped,
            failed=dict(self.failed),
            unknown=dict(self.unknown),
            cost=self.state.cost,
            wall_time=time.monotonic() - started,
            fatal=self.fatal,
        )

    async def _worker(self, feed: Iterable[tuple[BatchJob, JobRow]]) -> None:
        for job, row in feed:
            if self.fatal is not None:
                return
            self.state.queued -= 1
            self.state.running += 1
            try:
                await self._job(job, row)
            except _Stop:
                pass
            finally:
                self.state.running -= 1

    def _fail(
        self, index: int, code: str | None, message: str | None, task_id: str | None = None
    ) -> None:
        """Count a failed job (under ``failed`` if it has no code) and emit ``failed``."""
        self.state.failed += 1
        self.failed[code or "failed"] += 1
        self.emit("failed", index, task_id=task_id, code=code, message=message)

    def _count_unknown(self, index: int, request_id: str | None, message: str | None) -> None:
        """Count a job whose create outcome is unknown and emit ``unknown``."""
        self.unknown[index] = request_id
        self.state.failed += 1
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
                request = client.build_request(**job.params)
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

    async def _download(
        self, index: int, result: GenerationResult, life: JobLifecycle
    ) -> None:
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
                result=json.dumps(_result_json(result), sort_keys=True),
                files=json.dumps(files),
                cost=None if result.cost is None else str(result.cost),
                error_code=None,
                error_message=None,
            )
            self.state.done += 1
            self.state.cost += result.cost or 0
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


def _result_json(result: GenerationResult) -> dict[str, Any]:
    return {
        "task_id": result.task_id,
        "image_urls": result.image_urls,
        "job_id": result.job_id,
        "cost": None if result.cost is None else str(result.cost),
        "model": result.model,
    }


def write_results(rows: Iterable[JobRow], path: Path) -> None:
    """Write ``results.jsonl`` (one line per job) atomically; no secret ever goes in.

    ``files`` are names relative to the folder of ``results.jsonl`` (the output
    folder), so the folder can be moved or shared as a whole.
    """
    temp = path.with_name(f".{path.name}.tmp")
    # backslashreplace: a lone surrogate (in a prompt no check refused) is written as
    # its JSON escape, which reads back as the same text.
    with open(temp, "w", encoding="utf-8", errors="backslashreplace") as handle:
        for row in rows:
            record = {
                "index": row.index,
                "line": row.line,
                "state": row.state,
                "prompt": row.spec.get("prompt"),
                "task_id": row.task_id,
                "files": list(row.files),
                "image_urls": (row.result or {}).get("image_urls", []),
                "cost": None if row.cost is None else str(row.cost),
                "error": None
                if row.error_code is None and row.state != "unknown"
                else {"code": row.error_code, "message": row.error_message},
                "request_id": row.request_id,
                "creates": row.creates,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)
