"""Typed views of what the service returns: tasks and their results.

All classes are frozen attrs classes. Those made once or more per job (``Task``,
``OutputImage``, ``GenerationResult``) keep their fields in a ``__dict__`` rather
than slots: a frozen slotted ``__init__`` sets each field through
``object.__setattr__``, twice the cost per instance (0.75 vs 1.45 µs for
``Task``), and a job makes three of them. Parsing from the provider's JSON
lives in :mod:`dreamo_async.wire`; these classes only hold data and answer
questions about it (is the task finished? what did it cost?).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

import attrs

__all__ = [
    "GenerationResult",
    "OutputImage",
    "Task",
    "TaskError",
    "TaskStatus",
    "Usage",
]


class TaskStatus(enum.StrEnum):
    """The lifecycle of a task, normalised from the many words the provider uses.

    ``Task.raw_status`` keeps the word the service actually sent.
    """

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        """True once the task can no longer change: completed or failed."""
        return self in TERMINAL_STATUSES

    @classmethod
    def from_wire(cls, word: object) -> TaskStatus:
        """Map any status word to a status; unknown words mean "still running" (API.md).

        Case and surrounding whitespace do not matter. (Parsing a task looks the exact
        word up itself first, and comes here for any other.)
        """
        if not isinstance(word, str):
            return cls.PROCESSING
        return _STATUS_WORDS.get(word.strip().lower(), cls.PROCESSING)


#: The statuses after which a task never changes. Defined once, used everywhere.
TERMINAL_STATUSES: Final = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED})

_STATUS_WORDS: Final[Mapping[str, TaskStatus]] = {
    "pending": TaskStatus.PENDING,
    "queued": TaskStatus.PENDING,
    "in_queue": TaskStatus.PENDING,
    "processing": TaskStatus.PROCESSING,
    "in_progress": TaskStatus.PROCESSING,
    "running": TaskStatus.PROCESSING,
    "completed": TaskStatus.COMPLETED,
    "success": TaskStatus.COMPLETED,
    "succeeded": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    "error": TaskStatus.FAILED,
    "cancelled": TaskStatus.FAILED,
    "canceled": TaskStatus.FAILED,
}


@attrs.frozen(slots=False)  # see the module docstring
class OutputImage:
    """One generated image: where to fetch it (download promptly: URLs may expire)."""

    url: str
    type: str = "image"
    job_id: str | None = None


@attrs.frozen
class Usage:
    """What a task cost. ``cost`` is a Decimal parsed from the provider's USD string."""

    cost: Decimal | None = None
    discount: float | None = None


@attrs.frozen
class TaskError:
    """The error a failed task carries: the provider's code (always a string) and text."""

    code: str | None = None
    message: str | None = None


@attrs.frozen(slots=False)  # see the module docstring
class Task:
    """A snapshot of a task at the service, as returned by create and poll."""

    id: str
    status: TaskStatus
    #: The status word exactly as the service sent it.
    raw_status: str | None = None
    model: str | None = None
    #: 0.0-1.0 when the service reports it.
    progress: float | None = None
    created_at: dt.datetime | None = None
    images: tuple[OutputImage, ...] = ()
    usage: Usage | None = None
    error: TaskError | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    #: The task JSON as received (envelope removed); unknown fields live here.
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def is_terminal(self) -> bool:
        """True when the task is completed or failed."""
        return self.status.is_terminal


@attrs.frozen(slots=False)  # see the module docstring
class GenerationResult:
    """A completed generation."""

    task_id: str
    images: tuple[OutputImage, ...]
    cost: Decimal | None = None
    discount: float | None = None
    model: str | None = None
    created_at: dt.datetime | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def image_urls(self) -> list[str]:
        """The URLs of the generated images, in order."""
        return [image.url for image in self.images]

    @property
    def job_id(self) -> str | None:
        """The remote job id (``jobId``) of the first image that has one."""
        return next((image.job_id for image in self.images if image.job_id), None)

    @classmethod
    def from_task(cls, task: Task) -> GenerationResult:
        """Build the result of a completed task."""
        usage = task.usage
        return cls(  # positional, in field order: one per job, on the hot path
            task.id,
            task.images,
            None if usage is None else usage.cost,
            None if usage is None else usage.discount,
            task.model,
            task.created_at,
            task.metadata,
            task.raw,
        )
