"""The one-task commands: ``generate``, ``status`` and ``wait``."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ..images import path_or_url
from .display import StatusLine, describe
from .options import (
    Service,
    common,
    generation_options,
    out_option,
    polling,
    spending,
    writable_folder,
)
from .output import money, result_json, task_json
from .running import EXIT_FAILED, EXIT_OK, fail, print_json, run

__all__ = ["generate", "status", "wait_cmd"]


def ended_text(error: BaseException, job: Any, out: Path) -> str:
    """What a user must know of a ``generate`` whose create ended by ``error`` (an error
    or Ctrl-C): read from the job's money state, as the batch journal reads it."""
    from ..batch import job_outcome, journal_state

    outcome = job_outcome(error, job)
    state = journal_state(outcome.money_state, task_id=outcome.task_id)
    if state == "created":
        resume = f"dreamo wait {outcome.task_id} --out {shlex.quote(str(out))}"
        return f"task {outcome.task_id} exists: resume with: {resume}"
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


@click.command()
@click.option("-p", "--prompt", required=True, help="The text instruction.")
@click.option(
    "-i",
    "--image",
    "images",
    multiple=True,
    required=True,
    help="Reference image (path or http(s) URL); repeat for up to 5.",
)
@generation_options
@out_option("Folder for the result images (created if missing).", default=Path("."))
@spending
@polling
@common
def generate(
    prompt: str,
    images: Sequence[str],
    ref_types: Sequence[str],
    out: Path,
    service: Service,
    as_json: bool,
    max_spend: Decimal | None,
    expected_cost: Decimal | None,
    **knobs: Any,
) -> None:
    """One generation: print the task id at once, a live status, then the saved files."""
    from ..lifecycle import JobLifecycle

    params: dict[str, Any] = {k: v for k, v in knobs.items() if v is not None}
    params["prompt"] = prompt
    params["images"] = [path_or_url(i) for i in images]  # local paths as Path
    if ref_types:
        params["ref_types"] = [r.upper() for r in ref_types]
    job = JobLifecycle()  # what the interrupt hint reads: sent? created?

    async def go() -> int:
        import dreamo_async as d
        from dreamo_async.download import download_result

        err = Console(stderr=True, highlight=False)
        client = service.client(concurrency=1, max_spend=max_spend, expected_cost=expected_cost)
        async with client:
            try:
                request = client.build_request(**params)
            except d.InvalidRequestError as exc:
                fail(exc)
            # A paid result must have somewhere to go: checked before the create is sent.
            await asyncio.to_thread(writable_folder, "--out", out)

            async def before_send(request_id: str) -> None:
                job.sending(request_id)  # from here on, Ctrl-C says a task may exist

            try:
                task = await client.submit(request, before_send=before_send)
            except d.DreamOError as exc:
                fail(exc, ended_text(exc, job, out))
            job.created(task.id)
            err.print(f"task {task.id} created")
            try:
                with StatusLine(err, task) as line:
                    result = await client.wait(task, on_poll=line.update)
                files = await download_result(client, result, out)
            except d.TaskFailedError as exc:
                fail(exc)
            except (d.DreamOError, OSError) as exc:  # OSError: the disk filled up meanwhile
                fail(exc, f"resume with: dreamo wait {task.id} --out {shlex.quote(str(out))}")
        if as_json:
            print_json(result_json(result, files))
        else:
            for path in files:
                click.echo(str(path))
            err.print(f"done: {len(files)} image(s), cost ${money(result.cost) or '?'}")
        return EXIT_OK

    run(go, lambda: ended_text(KeyboardInterrupt(), job, out), as_json=as_json)


@click.command()
@click.argument("task_id")
@common
def status(task_id: str, service: Service, as_json: bool) -> None:
    """One poll of a task: its status, progress, result URLs or error."""

    async def go() -> int:
        import dreamo_async as d

        async with service.client() as client:
            try:
                task = await client.get_task(task_id)
            except d.DreamOError as exc:
                fail(exc)
        if as_json:
            print_json(task_json(task))
        else:
            click.echo(describe(task))
            for image in task.images:
                click.echo(image.url)
            if task.error is not None:
                click.echo(f"error {task.error.code}: {task.error.message}")
        return EXIT_FAILED if task.status is d.TaskStatus.FAILED else EXIT_OK

    hint = f"the task is unaffected; poll it again with: dreamo status {task_id}"
    run(go, lambda: hint, as_json=as_json)


@click.command(name="wait")
@click.argument("task_id")
@out_option("Also download the result images into this folder (created if missing).", check=True)
@polling
@common
def wait_cmd(
    task_id: str,
    out: Path | None,
    service: Service,
    as_json: bool,
) -> None:
    """Poll a task to its end (after a timeout or a crash); optionally download."""

    async def go() -> int:
        import dreamo_async as d
        from dreamo_async.download import download_result

        err = Console(stderr=True, highlight=False)
        async with service.client() as client:
            try:
                with StatusLine(err, None) as line:
                    result = await client.wait(task_id, on_poll=line.update)
                files = [] if out is None else await download_result(client, result, out)
            except (d.DreamOError, OSError) as exc:
                fail(exc)
        if as_json:
            print_json(result_json(result, files))
        else:
            for text in [str(f) for f in files] or result.image_urls:
                click.echo(text)
        return EXIT_OK

    again = f"dreamo wait {task_id}" + (f" --out {shlex.quote(str(out))}" if out else "")
    run(go, lambda: f"the task keeps running: {again}", as_json=as_json)
