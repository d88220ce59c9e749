"""What people see: a task's live status line, the batch progress bar (or one plain
line per event when the output is not a terminal) and the batch summary."""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .running import user_message

if TYPE_CHECKING:
    from ..batch import BatchReport

__all__ = ["BatchDisplay", "StatusLine", "describe", "print_summary", "summary_rows"]


def describe(task: Any) -> str:
    progress = f" {task.progress:.0%}" if task.progress is not None else ""
    return f"{task.id}: {task.raw_status or task.status.value}{progress}"


class StatusLine:
    """The live status of one task: a spinner line on a terminal, a log line per change."""

    def __init__(self, console: Console, task: Any) -> None:
        self.console = console
        self.last: str | None = None
        first = describe(task) if task is not None else "polling"
        self.status = console.status(first) if console.is_terminal else None

    def __enter__(self) -> StatusLine:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.status is not None:
            self.status.stop()

    def update(self, task: Any) -> None:
        text = describe(task)
        if self.status is not None:
            self.status.update(escape(text))
        elif task.raw_status != self.last:
            self.console.print(escape(text), soft_wrap=True)
        self.last = task.raw_status


class BatchDisplay:
    """A progress bar on a terminal; one plain line per job event otherwise."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.tty = console.is_terminal
        self.started = time.monotonic()
        self.progress: Progress | None = None
        self.bar: TaskID | None = None

    def __enter__(self) -> BatchDisplay:
        return self

    def _start(self) -> None:
        """Show the bar at the first event: a journal refused before any (locked, or
        written for other jobs) leaves the terminal with its error alone."""
        if self.tty:
            self.progress = Progress(
                TextColumn("[bold]jobs[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "[green]{task.fields[done]} done[/green] · "
                    "[red]{task.fields[failed]} failed[/red] · "
                    "{task.fields[running]} running · {task.fields[queued]} queued · "
                    "${task.fields[cost]}"
                ),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.bar = self.progress.add_task(
                "jobs", total=self.total, done=0, failed=0, running=0, queued=0, cost="0"
            )

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def event(self, event: Any) -> None:
        if self.tty and self.progress is None:
            self._start()
        state = event.state
        if self.progress is not None and self.bar is not None:
            self.progress.update(
                self.bar,
                completed=state.done,
                done=state.done - state.failed,
                failed=state.failed,
                running=state.running,
                queued=state.queued,
                cost=str(state.cost),
            )
            if event.kind in ("failed", "unknown"):
                self.progress.console.print(self._line(event), soft_wrap=True)
            return
        if event.kind != "polled":
            self.console.print(self._line(event), soft_wrap=True)

    def _line(self, event: Any) -> str:
        elapsed = time.monotonic() - self.started
        head = f"[{elapsed:7.2f}s] job {event.index}"
        message = user_message(event.message or "")
        if event.kind == "created":
            text = f"{head} created task {event.task_id}"
        elif event.kind == "completed":
            text = f"{head} completed: {', '.join(event.files)}"
        elif event.kind == "skipped":
            text = f"{head} already completed (task {event.task_id})"
        elif event.kind == "unknown":
            text = f"{head} create outcome UNKNOWN, not re-sent: {message}"
        else:
            task = f" task {event.task_id}" if event.task_id else ""
            text = f"{head} failed [{event.code}]{task}: {message}"
        state = event.state
        return escape(
            f"{text}  ({state.done - state.failed} done, {state.failed} failed, "
            f"{state.running} running, "
            f"{state.queued} queued)"
        )


def summary_rows(
    report: BatchReport, journal_path: Path, max_spend: Decimal | None
) -> dict[str, str]:
    return {
        "jobs": str(report.total),
        "completed": f"{report.completed}"
        + (f" ({report.skipped} in earlier runs)" if report.skipped else ""),
        "failed": ", ".join(f"{n} × {c}" for c, n in sorted(report.failed.items())) or "0",
        "total cost": f"${report.cost}"
        + ("" if max_spend is None else f" of ${max_spend} (--max-spend)"),
        "wall time": f"{report.wall_time:.1f} s",
        "results": str(report.results_path),
        "journal": str(journal_path),
    }


def print_summary(
    report: BatchReport, rows: Mapping[str, str], err: Console, *, table_on_stderr: bool
) -> None:
    """The summary table, then what the user must act on (unknown outcomes, a stop)."""
    table = Table(title="summary", show_header=False, title_justify="left")
    for name, value in rows.items():
        table.add_row(name, escape(value))
    (err if table_on_stderr else Console(highlight=False)).print(table)
    if report.unknown:
        ids = ", ".join(f"job {i} (X-Request-Id {r})" for i, r in sorted(report.unknown.items()))
        err.print(
            f"[yellow]{len(report.unknown)} job(s) may have created a task whose id was "
            f"never received[/yellow]: {escape(ids)}. They were NOT sent again. Check "
            "with the provider, then re-run with --retry-unknown to send them again "
            "(may pay twice).",
            soft_wrap=True,
        )
    if report.fatal is not None:
        err.print(
            f"[red]stopped:[/red] {escape(user_message(report.fatal))}. Fix it and run the same "
            "command again: finished jobs are kept, created tasks are polled, not re-created.",
            soft_wrap=True,
        )
