"""Tasks of the fake service and how they are shown on the wire.

A task's state is a pure function of the server clock (no background timers):
``pending`` until ``starts_at``, ``processing`` until ``ends_at``, then
``completed`` or ``failed``. Computing it at poll time keeps the fake
deterministic and free of tasks to cancel at shutdown.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from ..errors import PROVIDER_ERROR_CODES

__all__ = [
    "CANONICAL_STATUSES",
    "CreatedAtFormat",
    "ErrorFormat",
    "FakeTask",
    "OutputLayout",
    "Presentation",
    "TaskState",
]

TaskState = Literal["pending", "processing", "completed", "failed"]
CANONICAL_STATUSES: Final[tuple[TaskState, ...]] = ("pending", "processing", "completed", "failed")
OutputLayout = Literal["content", "flat"]
CreatedAtFormat = Literal["s", "ms", "iso"]
ErrorFormat = Literal["message", "error_message", "string"]


@attrs.define
class FakeTask:
    """One task at the fake service. Times are on the server clock (seconds)."""

    id: str
    model: str
    prompt: str
    #: The create parameters without the image data.
    params: Mapping[str, Any]
    image_count: int
    #: The ``X-Request-Id`` header of the create request (``""`` when absent).
    request_id: str
    created_at: float
    #: Wall-clock creation time (epoch seconds), for ``created_at`` on the wire.
    created_wall: float
    starts_at: float
    #: ``math.inf`` for a task that never finishes (``[never]``).
    ends_at: float
    #: The provider error code the task ends with, or ``None`` for success.
    fail_code: str | None = None
    #: From this server time on the task id answers 404 (a service that lost the task).
    gone_at: float = math.inf
    #: ``usage.cost`` once completed (``None``: no cost reported); drawn at creation.
    cost: str | None = "0.03"

    def state_at(self, now: float) -> TaskState:
        """The canonical status at server time ``now``."""
        if now < self.starts_at:
            return "pending"
        if now < self.ends_at:
            return "processing"
        return "failed" if self.fail_code is not None else "completed"

    def progress_at(self, now: float) -> float:
        """Linear progress 0..1 while running (0 while queued or when it never ends)."""
        if now < self.starts_at or not math.isfinite(self.ends_at):
            return 0.0
        span = self.ends_at - self.starts_at
        if span <= 0:
            return 1.0
        return round(min(1.0, (now - self.starts_at) / span), 4)

    def is_open(self, now: float) -> bool:
        """Running at the service (created, completion time not reached)."""
        return now < self.ends_at


@attrs.frozen(kw_only=True)
class Presentation:
    """How the server spells tasks: the documented variants a robust client must accept."""

    base_url: str
    envelope: bool = False
    status_words: Mapping[str, str] = attrs.field(factory=dict)
    output_layout: OutputLayout = "content"
    created_at_format: CreatedAtFormat = "s"
    error_format: ErrorFormat = "message"
    report_progress: bool = False
    extra_fields: bool = False

    def word(self, state: TaskState) -> str:
        return self.status_words.get(state, state)

    def timestamp(self, wall: float) -> int | str:
        """Epoch seconds, milliseconds or ISO 8601, as configured."""
        if self.created_at_format == "ms":
            return int(wall * 1000)
        if self.created_at_format == "iso":
            return dt.datetime.fromtimestamp(wall, tz=dt.UTC).isoformat()
        return int(wall)

    def wrap(self, data: Any) -> Any:
        """Put a successful answer in the ``{"data", "status"}`` envelope when configured."""
        if not self.envelope:
            return data
        return {"data": data, "status": {"code": 200, "message": "success"}}

    def created(self, task: FakeTask) -> dict[str, Any]:
        """The create answer: the new task, always ``pending``."""
        data: dict[str, Any] = {
            "id": task.id,
            "status": self.word("pending"),
            "model": task.model,
            "created_at": self.timestamp(task.created_wall),
        }
        if self.extra_fields:
            data["object"] = "generation.task"
        return data

    def result_url(self, task: FakeTask) -> str:
        return f"{self.base_url}/files/{task.id}/0.png"

    def describe(self, task: FakeTask, now: float) -> dict[str, Any]:
        """The poll answer at server time ``now``."""
        state = task.state_at(now)
        data = self.created(task)
        data["status"] = self.word(state)
        if state in ("pending", "processing"):
            if self.report_progress:
                data["progress"] = task.progress_at(now)
            return data
        if state == "failed":
            data["error"] = self._error(task.fail_code or "003013095")
            return data
        url = self.result_url(task)
        job = f"job-{task.id}"
        item: dict[str, Any] = {"type": "image", "url": url, "jobId": job}
        if self.extra_fields:
            item["format"] = "png"
        data["output"] = [item] if self.output_layout == "flat" else [{"content": [item]}]
        if task.cost is not None:
            data["usage"] = {"cost": task.cost, "discount": 1}
        completed_wall = task.created_wall + (task.ends_at - task.created_at)
        data["metadata"] = {"completed_at": self.timestamp(completed_wall)}
        if self.extra_fields:
            data.setdefault("usage", {})["currency"] = "USD"
            data["metadata"]["inference_ms"] = int((task.ends_at - task.starts_at) * 1000)
        return data

    def _error(self, code: str) -> Any:
        meaning = PROVIDER_ERROR_CODES.get(code, "generation failed")
        message = meaning[:1].upper() + meaning[1:]
        if self.error_format == "string":
            return f"{code}: {message}"
        key = "error_message" if self.error_format == "error_message" else "message"
        return {"code": code, key: message}
