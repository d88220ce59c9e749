"""The ``dreamo`` command: one generation, resumable bulk runs, task lookups, a demo.

Built on two well-kept libraries rather than hand-rolled code, both in the
``cli`` extra (library users need neither; without them the command prints an
install hint):

* **click** parses and validates arguments (types, ranges, choices, files) with
  usage errors on exit code 2 and help text for free, and ships ``CliRunner``
  for tests;
* **rich** draws the progress bar and the summary table, and falls back to
  plain text by itself when the output is not a terminal (a pipe, a CI log).

Exit codes: 0 every job done, 1 some jobs failed (or their outcome is
unknown), 2 usage or input error (nothing was sent), 3 the service is
unreachable or refused the key, 130 interrupted (Ctrl-C; the journal keeps
every state, so re-running resumes).

The API key comes from ``DREAMO_API_KEY`` / ``VTRIX_API_KEY`` or from
``--api-key-file``; there is deliberately no ``--api-key`` option, which would
land in shell history and in ``ps`` output.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeVar

if TYPE_CHECKING:
    from .batch import BatchReport

__all__ = ["main"]

_INSTALL_HINT = "the dreamo command needs the 'cli' extra: pip install 'dreamo_async[cli]'\n"

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_SERVICE: Final = 3
EXIT_INTERRUPTED: Final = 130

_F = TypeVar("_F", bound=Callable[..., Any])
#: ``--rps``: a number of requests per second, or ``"auto"``.
_RateValue = float | Literal["auto"]

try:
    import click
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
except ImportError:  # pragma: no cover - exercised only without the extra
    click = None  # type: ignore[assignment]


def main() -> None:
    """Console-script entry point."""
    if click is None:  # pragma: no cover
        sys.stderr.write(_INSTALL_HINT)
        raise SystemExit(EXIT_USAGE)
    try:
        cli.main(prog_name="dreamo", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - click turns it into Abort below
        _interrupted()


_JOURNAL_HINT: Final = "every job state is in the journal; run the same command again to resume"


def _interrupted(hint: str = _JOURNAL_HINT) -> NoReturn:
    sys.stderr.write(f"\ninterrupted: {hint}\n")
    raise SystemExit(EXIT_INTERRUPTED)


class _Exit(Exception):
    """Leave a command with an exit code after printing ``message`` (to stderr)."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _run(coro_fn: Callable[[], Any], hint: Callable[[], str] = lambda: _JOURNAL_HINT) -> NoReturn:
    """Run a command's coroutine; map our errors and Ctrl-C to exit codes."""
    try:
        code = asyncio.run(coro_fn())
    except KeyboardInterrupt:
        _interrupted(hint())
    except _Exit as exc:
        if exc.message:
            Console(stderr=True, highlight=False).print(
                f"[red]error:[/red] {escape(exc.message)}", soft_wrap=True
            )
        raise SystemExit(exc.code) from None
    raise SystemExit(code)


def _read_key(api_key_file: Path | None) -> str:
    from .client import API_KEY_ENV_VARS

    if api_key_file is not None:
        try:
            key = api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise _Exit(EXIT_USAGE, f"cannot read --api-key-file {api_key_file}: {exc}") from None
        if not key:
            raise _Exit(EXIT_USAGE, f"--api-key-file {api_key_file} is empty")
        return key
    for name in API_KEY_ENV_VARS:
        if value := os.environ.get(name, "").strip():
            return value
    raise _Exit(
        EXIT_USAGE,
        "no API key: set DREAMO_API_KEY (or VTRIX_API_KEY), or pass --api-key-file FILE",
    )


def _service_error(exc: BaseException) -> int | None:
    """Exit code 3 for errors that mean "the service cannot be used", else ``None``."""
    from .errors import SERVICE_ERRORS

    return EXIT_SERVICE if isinstance(exc, SERVICE_ERRORS) else None


def _ended_text(error: BaseException, job: Any) -> str:
    """What a user must know of a ``generate`` whose create ended by ``error`` (an error
    or Ctrl-C): read from the job's money state, as the batch journal reads it."""
    from .batch import job_outcome, journal_state

    outcome = job_outcome(error, job)
    state = journal_state(outcome.money_state, task_id=outcome.task_id)
    if state == "created":
        return f"task {outcome.task_id} exists: resume with: dreamo wait {outcome.task_id}"
    if state == "unknown":
        return (
            f"a task may have been created (X-Request-Id {outcome.request_id}), and its id was "
            "never received; it was not sent again. Check with the provider, quoting the "
            "X-Request-Id, before running the same command again: that may pay twice"
        )
    if outcome.task_id is not None:  # the task ended failed at the service
        return f"task {outcome.task_id} failed"
    if outcome.request_id is None:
        return "nothing was sent, no task was created"
    return "the service created no task"


def _writable_folder(option: str, folder: Path) -> None:
    """Create ``folder`` if missing and prove it writable, before anything is sent:
    a result paid for must have somewhere to go. A usage error (exit 2) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe, name = tempfile.mkstemp(dir=folder, prefix=".dreamo-probe-")
        os.close(probe)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.BadParameter(
            f"cannot write into {folder}: {reason} (nothing was sent)", param_hint=f"'{option}'"
        ) from None


if click is not None:

    def _out_folder(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
        """Click callback of ``--out``: the folder exists (created) and is writable."""
        if value is not None:
            _writable_folder("--out", value)
        return value

    class _Rate(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.5 on
        """``--rps``: requests per second (> 0), or ``auto`` (learned from the service's 429s)."""

        name = "rate"

        def convert(
            self, value: Any, param: click.Parameter | None, ctx: click.Context | None
        ) -> _RateValue:
            if isinstance(value, str) and value.strip().lower() == "auto":
                return "auto"
            try:
                rate = float(value)
            except (TypeError, ValueError):
                rate = math.nan
            if not 0 < rate < math.inf:
                self.fail(f"{value!r} is not a rate: give a number > 0 or 'auto'", param, ctx)
            return rate

    _RATE = _Rate()

    class _Money(click.ParamType[Decimal]):
        """An amount in USD (a Decimal, so costs add up exactly)."""

        name = "usd"

        def convert(self, value: Any, param: Any, ctx: Any) -> Decimal:
            from .coordination import to_money
            from .errors import ConfigurationError

            try:
                amount = to_money(value, param.name if param else "amount")
            except ConfigurationError as exc:
                self.fail(str(exc), param, ctx)
            assert amount is not None
            return amount

    _MONEY = _Money()

    def _common(fn: _F) -> _F:
        """Options every command that talks to the service takes."""
        fn = click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print machine-readable JSON on stdout (human output goes to stderr).",
        )(fn)
        fn = click.option(
            "--base-url",
            envvar="DREAMO_BASE_URL",
            default=None,
            metavar="URL",
            help="Service base URL (default https://cloud.vtrix.ai; env DREAMO_BASE_URL).",
        )(fn)
        fn = click.option(
            "--retries",
            type=click.IntRange(0, 20),
            default=4,
            show_default=True,
            help="Retries of a request that surely did nothing (never of an ambiguous create).",
        )(fn)
        return click.option(
            "--api-key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Read the API key from this file (default: env DREAMO_API_KEY or "
            "VTRIX_API_KEY). There is no --api-key: it would land in shell history.",
        )(fn)

    def _spending(fn: _F) -> _F:
        """The money options: a cap, and the cost assumed per task."""
        fn = click.option(
            "--expected-cost",
            type=_MONEY,
            default=None,
            metavar="USD",
            help="Cost assumed per task until the service reports costs (the cap reserves it).",
        )(fn)
        return click.option(
            "--max-spend",
            type=_MONEY,
            default=None,
            metavar="USD",
            help="Send no create that could take the spend over this many USD.",
        )(fn)

    def _polling(fn: _F) -> _F:
        fn = click.option(
            "--poll-interval",
            type=click.FloatRange(0.01, 60),
            default=1.0,
            show_default=True,
            help="First delay between polls, seconds (it grows up to 10 s).",
        )(fn)
        return click.option(
            "--timeout",
            type=click.FloatRange(0, min_open=True),
            default=600.0,
            show_default=True,
            help="Deadline of each job once created, seconds.",
        )(fn)

    def _make_client(
        *,
        api_key: str,
        base_url: str | None,
        concurrency: int = 4,
        rps: _RateValue | None = None,
        poll_interval: float = 1.0,
        timeout: float = 600.0,
        retries: int = 4,
        max_spend: Decimal | None = None,
        expected_cost: Decimal | None = None,
    ) -> Any:
        import dreamo_async as d

        try:
            return d.DreamOClient(
                max_spend=max_spend,
                expected_cost=expected_cost,
                api_key=api_key,
                base_url=base_url,
                max_concurrency=concurrency,
                requests_per_second=rps,
                burst=max(1, int(rps)) if isinstance(rps, float) else 1,
                poll=d.PollPolicy(
                    initial_delay=poll_interval,
                    max_delay=max(10.0, poll_interval),
                    timeout=timeout,
                ),
                retry=d.RetryPolicy(max_attempts=retries + 1),
            )
        except d.ConfigurationError as exc:
            raise _Exit(EXIT_USAGE, str(exc)) from None

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="dreamo_async")
    def cli() -> None:
        """Generate images with Spark DreamO (Multi-IP) from the command line.

        Key: env DREAMO_API_KEY or VTRIX_API_KEY, or --api-key-file. Exit codes:
        0 all done, 1 some jobs failed, 2 usage/input error, 3 service unreachable
        or key refused, 130 interrupted.
        """

    # -- generate ------------------------------------------------------------------------

    @cli.command()
    @click.option("-p", "--prompt", required=True, help="The text instruction.")
    @click.option(
        "-i",
        "--image",
        "images",
        multiple=True,
        required=True,
        help="Reference image (path or http(s) URL); repeat for up to 5.",
    )
    @click.option(
        "--ref-type",
        "ref_types",
        multiple=True,
        type=click.Choice(["IP", "ID", "STYLE", "AUTO"], case_sensitive=False),
        help="One per image, in order: IP (subject), ID (face), STYLE, AUTO.",
    )
    @click.option(
        "--model",
        type=click.Choice(["spark_multi_dreamo", "spark_dreamo"]),
        default=None,
        help="Model id (default spark_multi_dreamo).",
    )
    @click.option("--guidance-scale1", type=click.FloatRange(1.0, 7.0), help="1.0-7.0, text.")
    @click.option("--guidance-scale2", type=click.FloatRange(1.0, 7.0), help="1.0-7.0, images.")
    @click.option("--ddim-steps", type=click.IntRange(1, 50), help="1-50 denoising steps.")
    @click.option("--swap-face/--no-swap-face", default=None, help="Face-ID enhancement.")
    @click.option(
        "--use-rephraser/--no-rephraser", default=None, help="Let the server rewrite the prompt."
    )
    @click.option(
        "--rephraser-level",
        type=click.Choice(["general", "fine", "coarse"]),
        default=None,
        help="How finely the prompt is rewritten.",
    )
    @click.option("--seed", type=click.IntRange(-1, 2**31 - 1), help="-1 = random.")
    @click.option("--width", type=click.IntRange(512, 2048), help="512-2048.")
    @click.option("--height", type=click.IntRange(512, 2048), help="512-2048.")
    @click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("."),
        show_default=True,
        help="Folder for the result images (created if missing).",
    )
    @_spending
    @_polling
    @_common
    def generate(
        prompt: str,
        images: Sequence[str],
        ref_types: Sequence[str],
        out: Path,
        api_key_file: Path | None,
        base_url: str | None,
        as_json: bool,
        timeout: float,
        poll_interval: float,
        retries: int,
        max_spend: Decimal | None,
        expected_cost: Decimal | None,
        **knobs: Any,
    ) -> None:
        """One generation: print the task id at once, a live status, then the saved files."""
        params: dict[str, Any] = {k: v for k, v in knobs.items() if v is not None}
        params["prompt"] = prompt
        from .images import path_or_url

        params["images"] = [path_or_url(i) for i in images]  # local paths as Path
        if ref_types:
            params["ref_types"] = [r.upper() for r in ref_types]
        from .lifecycle import JobLifecycle

        job = JobLifecycle()  # what the interrupt hint reads: sent? created?
        _run(
            lambda: _generate(
                params,
                out,
                api_key_file,
                base_url,
                as_json,
                timeout,
                poll_interval,
                retries,
                job,
                max_spend=max_spend,
                expected_cost=expected_cost,
            ),
            lambda: _ended_text(KeyboardInterrupt(), job),
        )

    async def _generate(
        params: dict[str, Any],
        out: Path,
        api_key_file: Path | None,
        base_url: str | None,
        as_json: bool,
        timeout: float,
        poll_interval: float,
        retries: int,
        job: Any,
        *,
        max_spend: Decimal | None = None,
        expected_cost: Decimal | None = None,
    ) -> int:
        import dreamo_async as d
        from dreamo_async.download import download_result

        err = Console(stderr=True, highlight=False)
        key = _read_key(api_key_file)
        async with _make_client(
            api_key=key,
            base_url=base_url,
            concurrency=1,
            poll_interval=poll_interval,
            timeout=timeout,
            retries=retries,
            max_spend=max_spend,
            expected_cost=expected_cost,
        ) as client:
            try:
                request = client.build_request(**params)
            except d.InvalidRequestError as exc:
                raise _Exit(EXIT_USAGE, str(exc)) from None
            # A paid result must have somewhere to go: checked before the create is sent.
            await asyncio.to_thread(_writable_folder, "--out", out)

            async def before_send(request_id: str) -> None:
                job.sending(request_id)  # from here on, Ctrl-C says a task may exist

            try:
                task = await client.submit(request, before_send=before_send)
            except d.DreamOError as exc:
                code = _service_error(exc) or EXIT_FAILED
                raise _Exit(code, f"{exc}\n{_ended_text(exc, job)}") from None
            job.created(task.id)
            err.print(f"task {task.id} created")
            try:
                with _StatusLine(err, task) as line:
                    result = await client.wait(task, on_poll=line.update)
                files = await download_result(client, result, out)
            except d.TaskFailedError as exc:
                raise _Exit(EXIT_FAILED, str(exc)) from None
            except (d.DreamOError, OSError) as exc:  # OSError: the disk filled up meanwhile
                hint = f" (resume with: dreamo wait {task.id})"
                raise _Exit(_service_error(exc) or EXIT_FAILED, f"{exc}{hint}") from None
        if as_json:
            _print_json(
                {
                    "task_id": result.task_id,
                    "files": [str(f) for f in files],
                    "image_urls": result.image_urls,
                    "cost": _money(result.cost),
                }
            )
        else:
            for path in files:
                click.echo(str(path))
            err.print(f"done: {len(files)} image(s), cost ${_money(result.cost) or '?'}")
        return EXIT_OK

    class _StatusLine:
        """The live status of one task: a spinner line on a terminal, a log line per change."""

        def __init__(self, console: Console, task: Any) -> None:
            self.console = console
            self.last: str | None = None
            first = _describe(task) if task is not None else "polling"
            self.status = console.status(first) if console.is_terminal else None

        def __enter__(self) -> _StatusLine:
            if self.status is not None:
                self.status.start()
            return self

        def __exit__(self, *exc_info: object) -> None:
            if self.status is not None:
                self.status.stop()

        def update(self, task: Any) -> None:
            text = _describe(task)
            if self.status is not None:
                self.status.update(escape(text))
            elif task.raw_status != self.last:
                self.console.print(escape(text), soft_wrap=True)
            self.last = task.raw_status

    def _describe(task: Any) -> str:
        progress = f" {task.progress:.0%}" if task.progress is not None else ""
        return f"{task.id}: {task.raw_status or task.status.value}{progress}"

    # -- status / wait ----------------------------------------------------------------------

    @cli.command()
    @click.argument("task_id")
    @_common
    def status(
        task_id: str, api_key_file: Path | None, base_url: str | None, as_json: bool, retries: int
    ) -> None:
        """One poll of a task: its status, progress, result URLs or error."""

        async def go() -> int:
            import dreamo_async as d

            key = _read_key(api_key_file)
            async with _make_client(api_key=key, base_url=base_url, retries=retries) as client:
                try:
                    task = await client.get_task(task_id)
                except d.DreamOError as exc:
                    raise _Exit(_service_error(exc) or EXIT_FAILED, str(exc)) from None
            if as_json:
                _print_json(_task_json(task))
            else:
                click.echo(_describe(task))
                for image in task.images:
                    click.echo(image.url)
                if task.error is not None:
                    click.echo(f"error {task.error.code}: {task.error.message}")
            return EXIT_FAILED if task.status is d.TaskStatus.FAILED else EXIT_OK

        _run(go, lambda: f"the task is unaffected; poll it again with: dreamo status {task_id}")

    @cli.command(name="wait")
    @click.argument("task_id")
    @click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        callback=_out_folder,
        help="Also download the result images into this folder (created if missing).",
    )
    @_polling
    @_common
    def wait_cmd(
        task_id: str,
        out: Path | None,
        api_key_file: Path | None,
        base_url: str | None,
        as_json: bool,
        timeout: float,
        poll_interval: float,
        retries: int,
    ) -> None:
        """Poll a task to its end (after a timeout or a crash); optionally download."""

        async def go() -> int:
            import dreamo_async as d
            from dreamo_async.download import download_result

            err = Console(stderr=True, highlight=False)
            key = _read_key(api_key_file)
            async with _make_client(
                api_key=key,
                base_url=base_url,
                poll_interval=poll_interval,
                timeout=timeout,
                retries=retries,
            ) as client:
                try:
                    with _StatusLine(err, None) as line:
                        result = await client.wait(task_id, on_poll=line.update)
                    files = [] if out is None else await download_result(client, result, out)
                except (d.DreamOError, OSError) as exc:
                    raise _Exit(_service_error(exc) or EXIT_FAILED, str(exc)) from None
            if as_json:
                _print_json(
                    {
                        "task_id": result.task_id,
                        "image_urls": result.image_urls,
                        "files": [str(f) for f in files],
                        "cost": _money(result.cost),
                    }
                )
            else:
                for text in [str(f) for f in files] or result.image_urls:
                    click.echo(text)
            return EXIT_OK

        _run(go, lambda: f"the task keeps running: dreamo wait {task_id}")

    # -- batch --------------------------------------------------------------------------------

    @cli.command()
    @click.argument("jobs_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        help="Folder for the images, results.jsonl and (by default) the journal.",
    )
    @click.option(
        "--concurrency",
        type=click.IntRange(1, 512),
        default=4,
        show_default=True,
        help="Jobs creating or polling at once.",
    )
    @click.option(
        "--rps",
        type=_RATE,
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
    @_spending
    @_polling
    @_common
    def batch(
        jobs_file: Path,
        out: Path,
        concurrency: int,
        rps: _RateValue | None,
        journal: Path | None,
        retry_unknown: bool,
        retry_failed: bool,
        dry_run: bool,
        max_spend: Decimal | None,
        expected_cost: Decimal | None,
        api_key_file: Path | None,
        base_url: str | None,
        as_json: bool,
        timeout: float,
        poll_interval: float,
        retries: int,
    ) -> None:
        """Run every job of a JSON-lines file, resumably (one job per line).

        Each line has the keywords of the Python API, e.g.
        {"prompt": "...", "images": ["a.jpg", "b.png"], "ref_types": ["IP", "ID"], "seed": 7};
        relative image paths resolve against the file's folder. The whole file is
        checked before anything is sent. --max-spend caps the spend of the whole
        batch, earlier runs of the journal included: jobs it stops stay not started,
        and a re-run with a higher cap sends them.
        """
        from .batch import JobsFileError, journal_spending, load_jobs

        try:
            jobs = load_jobs(jobs_file)
        except JobsFileError as exc:
            err = Console(stderr=True, highlight=False)
            for problem in exc.problems[:50]:
                err.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True)
            if len(exc.problems) > 50:
                err.print(f"... and {len(exc.problems) - 50} more")
            err.print("nothing was sent")
            raise SystemExit(EXIT_USAGE) from None
        journal_path = journal or out / "dreamo-journal.db"
        spent_before, highest, unpriced = journal_spending(journal_path)
        per_job = expected_cost or highest
        # The cap is the batch's: what earlier runs of this journal spent counts against
        # it, tasks that may be billed without a reported cost at the estimate per job.
        spent_before += unpriced * (per_job or 0)
        if dry_run:
            _dry_run(len(jobs), per_job, spent_before, max_spend, as_json)
            raise SystemExit(EXIT_OK)
        _writable_folder("--out", out)  # the jobs are fine: now their results need a home
        if journal is not None:
            _writable_folder("--journal", journal.parent)
        room = None if max_spend is None else max(Decimal(0), max_spend - spent_before)

        async def go() -> int:
            key = _read_key(api_key_file)
            client = _make_client(
                api_key=key,
                base_url=base_url,
                concurrency=concurrency,
                rps=rps,
                poll_interval=poll_interval,
                timeout=timeout,
                retries=retries,
                max_spend=room,
                expected_cost=expected_cost,
            )
            async with client:
                code, _ = await _run_batch_ui(
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

        _run(go)

    def _dry_run(
        jobs: int,
        per_job: Decimal | None,
        spent_before: Decimal,
        max_spend: Decimal | None,
        as_json: bool,
    ) -> None:
        """Print what a run would do: the job count and a cost estimate (nothing is sent)."""
        estimate = None if per_job is None else per_job * jobs
        if as_json:
            _print_json(
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

    async def _run_batch_ui(
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
        from .batch import JournalError, _RunJournalError, run_batch

        err = Console(stderr=True, highlight=False)
        display = _Display(err, len(jobs))
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
            # Refused up front (locked, unopenable, written for other jobs): nothing was
            # sent, an input error. Failed once jobs ran: requests were sent, a failed run.
            failed_run = isinstance(exc, _RunJournalError)
            raise _Exit(EXIT_FAILED if failed_run else EXIT_USAGE, str(exc)) from None
        code = EXIT_SERVICE if report.fatal is not None else EXIT_OK if report.ok else EXIT_FAILED
        rows: dict[str, str] = {
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
        if extra_rows is not None:
            rows.update(extra_rows())
        if as_json:
            _print_json(
                {
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
        table = Table(title="summary", show_header=False, title_justify="left")
        for name, value in rows.items():
            table.add_row(name, escape(value))
        (err if as_json else Console(highlight=False)).print(table)
        if report.unknown:
            ids = ", ".join(
                f"job {i} (X-Request-Id {r})" for i, r in sorted(report.unknown.items())
            )
            err.print(
                f"[yellow]{len(report.unknown)} job(s) may have created a task whose id was "
                f"never received[/yellow]: {escape(ids)}. They were NOT sent again. Check "
                "with the provider, then re-run with --retry-unknown to send them again "
                "(may pay twice).",
                soft_wrap=True,
            )
        if report.fatal is not None:
            err.print(
                f"[red]stopped:[/red] {escape(str(report.fatal))}. Fix it and run the same "
                "command again: finished jobs are kept, created tasks are polled, not re-created.",
                soft_wrap=True,
            )
        return code, report

    class _Display:
        """A progress bar on a terminal; one plain line per job event otherwise."""

        def __init__(self, console: Console, total: int) -> None:
            self.console = console
            self.total = total
            self.tty = console.is_terminal
            self.started = time.monotonic()
            self.progress: Progress | None = None
            self.bar: TaskID | None = None

        def __enter__(self) -> _Display:
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
                    completed=state.done + state.failed,
                    done=state.done,
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
            if event.kind == "created":
                text = f"{head} created task {event.task_id}"
            elif event.kind == "completed":
                text = f"{head} completed: {', '.join(event.files)}"
            elif event.kind == "skipped":
                text = f"{head} already completed (task {event.task_id})"
            elif event.kind == "unknown":
                text = f"{head} create outcome UNKNOWN, not re-sent: {event.message or ''}"
            else:
                task = f" task {event.task_id}" if event.task_id else ""
                text = f"{head} failed [{event.code}]{task}: {event.message}"
            state = event.state
            return escape(
                f"{text}  ({state.done} done, {state.failed} failed, {state.running} running, "
                f"{state.queued} queued)"
            )

    # -- demo ---------------------------------------------------------------------------------

    @cli.command()
    @click.option("--jobs", type=click.IntRange(1, 10_000), default=24, show_default=True)
    @click.option("--concurrency", type=click.IntRange(1, 512), default=6, show_default=True)
    @click.option("--rps", type=_RATE, default=20.0, show_default=True)
    @click.option(
        "--task-ms",
        type=click.FloatRange(0),
        default=1500,
        show_default=True,
        help="Simulated generation time (ms).",
    )
    @click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        callback=_out_folder,
        help="Keep the images here (default: a temporary folder, removed at the end).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
    def demo(
        jobs: int,
        concurrency: int,
        rps: _RateValue,
        task_ms: float,
        out: Path | None,
        as_json: bool,
    ) -> None:
        """The batch engine against the built-in fake service (no key, no network)."""
        _run(
            lambda: _demo(jobs, concurrency, rps, task_ms, out, as_json),
            lambda: "the demo ran against the built-in fake service only; nothing real was sent",
        )

    async def _demo(
        jobs: int,
        concurrency: int,
        rps: _RateValue,
        task_ms: float,
        out: Path | None,
        as_json: bool,
    ) -> int:
        # Imported here: the library never imports its test seam; only this command does.
        from dreamo_async.batch import BatchJob
        from dreamo_async.testing import FakeDreamOServer, sample_images

        images = [str(p) for p in sample_images()]
        prompts = [
            "the subject of image 1 as a watercolour postcard",
            "image 1's character exploring a neon city at night",
            "a product shot of the object in image 1 on white marble",
            "the subject of image 1 and image 2 sharing a picnic",
        ]
        batch = []
        for i in range(jobs):
            refs = [images[i % len(images)], images[(i + 1) % len(images)]][: 1 + i % 2]
            prompt = prompts[i % len(prompts)]
            if jobs > 2 and i in (jobs // 3, 2 * jobs // 3):
                prompt += " [fail:003013095]"  # scripted failures show the error path
            params = {"prompt": prompt, "images": refs, "seed": i, "ref_types": ["IP"] * len(refs)}
            batch.append(BatchJob(index=i, params=params, line=i + 1, source="<demo>"))
        err = Console(stderr=True, highlight=False)
        err.print(
            f"[bold]dreamo demo[/bold]: {jobs} jobs against the built-in fake service "
            f"(concurrency {concurrency}, {_rate_text(rps)} requests/s, ~{task_ms:g} ms per task; "
            f"{2 if jobs > 2 else 0} jobs are scripted to fail)"
        )
        with tempfile.TemporaryDirectory(prefix="dreamo-demo-") as scratch:
            folder = out or Path(scratch)
            async with FakeDreamOServer(
                api_key="demo-key", task_duration_ms=task_ms, report_progress=True
            ) as server:
                client = _make_client(
                    api_key="demo-key",
                    base_url=server.url,
                    concurrency=concurrency,
                    rps=rps,
                    poll_interval=0.2,
                    timeout=60,
                )
                async with client:
                    code, report = await _run_batch_ui(
                        client,
                        batch,
                        folder,
                        folder / "dreamo-journal.db",
                        concurrency=concurrency,
                        retry_unknown=False,
                        retry_failed=False,
                        as_json=as_json,
                        extra_rows=lambda: {
                            **(
                                {}
                                if out
                                else {
                                    "results": "in a temporary folder (keep them with --out DIR)",
                                    "journal": "in the same temporary folder",
                                }
                            ),
                            "creates at the server": str(server.stats.creates),
                            "polls at the server": str(server.stats.polls),
                            "downloads": str(server.stats.downloads),
                        },
                    )
        # Two failures are scripted: the demo succeeds when exactly those failed.
        scripted = {"003013095": 2} if jobs > 2 else {}
        if code == EXIT_FAILED and report.failed == scripted:
            return EXIT_OK
        return code


def _rate_text(rps: _RateValue) -> str:
    return f"{rps:g}" if isinstance(rps, float) else str(rps)


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _task_json(task: Any) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": task.status.value,
        "raw_status": task.raw_status,
        "progress": task.progress,
        "image_urls": [image.url for image in task.images],
        "cost": _money(task.usage.cost) if task.usage else None,
        "error": None
        if task.error is None
        else {"code": task.error.code, "message": task.error.message},
    }


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()
