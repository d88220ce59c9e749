"""``dreamo batch``: a resumable run of a JSON-lines jobs file, and its summary."""

from __future__ import annotations

import shlex
import warnings
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from ..images import path_or_url
from .display import BatchDisplay, print_summary, summary_rows
from .options import (
    RATE,
    RateValue,
    Service,
    common,
    out_option,
    polling,
    spending,
    writable_folder,
)
from .running import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SERVICE,
    EXIT_USAGE,
    emit_warning,
    error_json,
    fail,
    print_json,
    run,
)

if TYPE_CHECKING:
    from ..batch import BatchReport

__all__ = ["batch", "run_batch_ui"]


def check_warnings(client: Any, jobs: Sequence[Any]) -> None:
    """Print each job's advisory warnings as ``jobs.jsonl:LINE: warning: ...`` before
    the run (the same text raised again during the run is not repeated)."""
    for job in jobs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                images = [path_or_url(i) for i in job.params.get("images", [])]
                client.build_request(**{**job.params, "images": images})
            except Exception:  # load_jobs checked it; the run reports what is left
                continue
        for warning in caught:
            emit_warning(str(warning.message), job.source, job.line)


def print_dry_run(
    jobs: int,
    per_job: Decimal | None,
    spent_before: Decimal,
    max_spend: Decimal | None,
    as_json: bool,
) -> None:
    """Print what a run would do: the job count and a cost estimate (nothing is sent)."""
    estimate = None if per_job is None else per_job * jobs
    if as_json:
        print_json(
            {
                "jobs": jobs,
                "cost_per_job": None if per_job is None else str(per_job),
                "estimate": None if estimate is None else str(estimate),
                "spent_before": str(spent_before),
                "max_spend": None if max_spend is None else str(max_spend),
                "sent": 0,
            }
        )
        return
    click.echo(f"{jobs} job(s) checked, nothing sent")
    if estimate is None:
        click.echo("cost estimate: unknown (give --expected-cost, or run once to learn it)")
    else:
        click.echo(f"cost estimate: ${estimate} (${per_job} per job, the highest seen)")
    if spent_before:
        click.echo(f"spent by earlier runs of this journal: ${spent_before}")
    if max_spend is not None and estimate is not None and spent_before + estimate > max_spend:
        click.echo(f"over --max-spend ${max_spend}: the cap would stop some jobs")


async def run_batch_ui(
    client: Any,
    jobs: Sequence[Any],
    out: Path,
    journal_path: Path,
    *,
    concurrency: int,
    retry_unknown: bool,
    retry_failed: bool,
    as_json: bool,
    extra_rows: Callable[[], Mapping[str, str]] | None = None,
    max_spend: Decimal | None = None,
) -> tuple[int, BatchReport]:
    """Run the batch engine with a progress display, print the summary; return the
    exit code and the report."""
    from ..batch import JournalError, run_batch

    err = Console(stderr=True, highlight=False)
    display = BatchDisplay(err, len(jobs))
    try:
        with display:
            report = await run_batch(
                client,
                jobs,
                journal_path,  # run_batch opens and closes it (off the event loop)
                out,
                concurrency=concurrency,
                retry_unknown=retry_unknown,
                retry_failed=retry_failed,
                on_event=display.event,
            )
    except JournalError as exc:
        fail(exc)
    code = EXIT_SERVICE if report.fatal is not None else EXIT_OK if report.ok else EXIT_FAILED
    rows = summary_rows(report, journal_path, max_spend)
    if extra_rows is not None:
        rows.update(extra_rows())
    if as_json:
        print_json(
            {
                "ok": code == EXIT_OK,
                "jobs": report.total,
                "completed": report.completed,
                "skipped": report.skipped,
                "failed": dict(report.failed),
                "unknown": {str(k): v for k, v in report.unknown.items()},
                "cost": str(report.cost),
                "max_spend": None if max_spend is None else str(max_spend),
                "wall_time": round(report.wall_time, 3),
                "results": str(report.results_path),
                "journal": str(journal_path),
                "fatal": None if report.fatal is None else str(report.fatal),
                "exit_code": code,
            }
        )
    print_summary(report, rows, err, table_on_stderr=as_json)
    return code, report


@click.command()
@click.argument("jobs_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@out_option("Folder for the images, results.jsonl and (by default) the journal.", required=True)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=4,
    show_default=True,
    help="Jobs creating or polling at once.",
)
@click.option(
    "--rps",
    type=RATE,
    default=None,
    help="Most API requests per second (creates and polls together), or 'auto': "
    "learned from the service's 429 answers.",
)
@click.option(
    "--journal",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite journal (default OUT/dreamo-journal.db). Re-run with the same one to resume.",
)
@click.option(
    "--retry-unknown",
    is_flag=True,
    help="Send again jobs whose create outcome is unknown (a task may exist: may pay twice).",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Create again jobs whose task failed at the service (pays again).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the whole file and print the job count and a cost estimate; send nothing.",
)
@spending
@polling
@common
def batch(
    jobs_file: Path,
    out: Path,
    concurrency: int,
    rps: RateValue | None,
    journal: Path | None,
    retry_unknown: bool,
    retry_failed: bool,
    dry_run: bool,
    max_spend: Decimal | None,
    expected_cost: Decimal | None,
    service: Service,
    as_json: bool,
) -> None:
    """Run every job of a JSON-lines file, resumably (one job per line).

    Each line has the keywords of the Python API, e.g.
    {"prompt": "...", "images": ["a.jpg", "b.png"], "ref_types": ["IP", "ID"], "seed": 7};
    relative image paths resolve against the file's folder. The whole file is
    checked before anything is sent. --max-spend caps the spend of the whole
    batch, earlier runs of the journal included: jobs it stops stay not started,
    and a re-run with a higher cap sends them.
    """
    from ..batch import JobsFileError, journal_spending, load_jobs

    try:
        jobs = load_jobs(jobs_file)
    except JobsFileError as exc:
        err = Console(stderr=True, highlight=False)
        for problem in exc.problems[:50]:
            err.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True)
        if len(exc.problems) > 50:
            err.print(f"... and {len(exc.problems) - 50} more")
        err.print("nothing was sent")
        if as_json:
            print_json(error_json(EXIT_USAGE, "\n".join(exc.problems), exc))
        raise SystemExit(EXIT_USAGE) from None
    journal_path = journal or out / "dreamo-journal.db"
    spent_before, highest, unpriced = journal_spending(journal_path)
    per_job = expected_cost or highest
    # The cap is the batch's: what earlier runs of this journal spent counts against
    # it, tasks that may be billed without a reported cost at the estimate per job.
    spent_before += unpriced * (per_job or 0)
    if dry_run:
        print_dry_run(len(jobs), per_job, spent_before, max_spend, as_json)
        raise SystemExit(EXIT_OK)
    writable_folder("--out", out)  # the jobs are fine: now their results need a home
    if journal is not None:
        writable_folder("--journal", journal.parent)
    room = None if max_spend is None else max(Decimal(0), max_spend - spent_before)
    again = f"dreamo batch {shlex.quote(str(jobs_file))} --out {shlex.quote(str(out))}"
    if journal is not None:
        again += f" --journal {shlex.quote(str(journal))}"

    async def go() -> int:
        client = service.client(
            concurrency=concurrency, rps=rps, max_spend=room, expected_cost=expected_cost
        )
        async with client:
            check_warnings(client, jobs)
            code, _ = await run_batch_ui(
                client,
                jobs,
                out,
                journal_path,
                concurrency=concurrency,
                retry_unknown=retry_unknown,
                retry_failed=retry_failed,
                as_json=as_json,
                max_spend=max_spend,
            )
        return code

    hint = f"every job state is in the journal; resume with: {again}"
    run(go, lambda: hint, as_json=as_json)
