"""The JSON objects the commands print under ``--json``: each built in one place.

``result_json`` is the CLI's one builder of a result record (``generate`` and
``wait`` share it); the batch writes its own ``results.jsonl`` records.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

__all__ = ["money", "result_json", "task_json"]


def money(value: Decimal | None) -> str | None:
    """USD as a string (exact), or ``None`` when the service reported no cost."""
    return None if value is None else str(value)


def result_json(result: Any, files: Sequence[Path] = ()) -> dict[str, Any]:
    """A finished task, as the journal keeps it (one builder: batch.result_json)."""
    from ..batch import result_json as batch_result_json

    return {"ok": True, **batch_result_json(result, files)}


def task_json(task: Any) -> dict[str, Any]:
    """One poll of a task, as ``dreamo status --json`` prints it."""
    return {
        "id": task.id,
        "status": task.status.value,
        "raw_status": task.raw_status,
        "progress": task.progress,
        "image_urls": [image.url for image in task.images],
        "cost": money(task.usage.cost) if task.usage else None,
        "error": None
        if task.error is None
        else {"code": task.error.code, "message": task.error.message},
    }
