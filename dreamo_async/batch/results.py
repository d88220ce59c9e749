"""What a batch leaves for people and scripts: ``results.jsonl``, and the JSON of one result
(the same object the ``dreamo`` command prints with ``--json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..download import fsync_directory

if TYPE_CHECKING:
    from ..models import GenerationResult
    from .journal import JobRow

__all__ = ["result_json", "write_results"]


def result_json(
    result: GenerationResult, files: Iterable[str | os.PathLike[str]] | None = None
) -> dict[str, Any]:
    """The JSON of one result: what the journal keeps and ``dreamo --json`` prints
    (``files``, the saved images, when given). No secret ever goes in."""
    data: dict[str, Any] = {
        "task_id": result.task_id,
        "image_urls": result.image_urls,
        "job_id": result.job_id,
        "cost": None if result.cost is None else str(result.cost),
        "model": result.model,
    }
    if files is not None:
        data["files"] = [str(path) for path in files]
    return data


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
