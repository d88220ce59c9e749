"""The journal of a batch: one SQLite file, written by one thread with group commits.

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
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, Self, TypeVar

import attrs

from ..errors import JournalError
from .jobs import BatchJob, JobState, params_json

__all__ = ["Fsync", "JobRow", "Journal", "JournalStats", "journal_spending"]

_T = TypeVar("_T")

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
        self._ready.clear()  # a journal reopened after close() waits for its new writer
        self._failure = None
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

    def __exit__(self, *exc_info: object) -> None:
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
                    self._commit_group(conn, group, synced=sync)
        finally:
            conn.close()

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Op], *, synced: bool) -> None:
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
        self.stats.synced_commits += synced  # counted before any waiter wakes to read it
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
                spec = json.dumps(dict(job.params), sort_keys=True, default=params_json)
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
