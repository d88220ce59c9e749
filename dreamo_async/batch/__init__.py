"""Resumable bulk runs: a SQLite journal so that no result is lost and no task is paid twice.

The package's parts: :mod:`.jobs` reads and checks a jobs file, :mod:`.journal` keeps
every job's state in SQLite, :mod:`.engine` runs the jobs (see its docstring for what
each state means on a re-run), :mod:`.results` writes ``results.jsonl``.
"""

from __future__ import annotations

from ..errors import JobsFileError, JournalError
from .engine import (
    BatchEvent,
    BatchReport,
    BatchState,
    JobOutcome,
    _RunJournalError,
    job_outcome,
    journal_state,
    run_batch,
)
from .jobs import JOB_KEYS, BatchJob, JobState, load_jobs
from .journal import JobRow, Journal, journal_spending
from .results import result_json, write_results

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
    "_RunJournalError",
    "job_outcome",
    "journal_spending",
    "journal_state",
    "load_jobs",
    "result_json",
    "run_batch",
    "write_results",
]
