"""The ``dreamo`` command.

Built on click (arguments, help, exit codes) and rich (progress bars, tables):
both are well kept, and neither is needed by library users, so they live in
the ``cli`` extra; without them the command prints an install hint.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from decimal import Decimal
from typing import Any

__all__ = ["main"]

_INSTALL_HINT = "the dreamo command needs the 'cli' extra: pip install 'dreamo_async[cli]'\n"

try:
    import click
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError:  # pragma: no cover - exercised only without the extra
    click = None  # type: ignore[assignment]


def main() -> None:
    """Console-script entry point."""
    if click is None:  # pragma: no cover
        sys.stderr.write(_INSTALL_HINT)
        raise SystemExit(2)
    cli()


if click is not None:

    @click.group()
    @click.version_option(package_name="dreamo_async")
    def cli() -> None:
        """Generate images with Spark DreamO (Multi-IP) from the command line."""

    @cli.command()
    @click.option("--jobs", default=24, show_default=True, help="Number of generations.")
    @click.option("--concurrency", default=6, show_default=True, help="Jobs alive at once.")
    @click.option("--rps", default=20.0, show_default=True, help="HTTP requests per second.")
    @click.option(
        "--task-ms", default=1500, show_default=True, help="Simulated generation time (ms)."
    )
    def demo(jobs: int, concurrency: int, rps: float, task_ms: int) -> None:
        """A bulk generation against the built-in fake service (no key, no network)."""
        outcome = asyncio.run(_demo(jobs, concurrency, rps, task_ms))
        raise SystemExit(outcome)


async def _demo(jobs: int, concurrency: int, rps: float, task_ms: int) -> int:
    # Imported here: the library never imports its test seam, only this command does.
    import dreamo_async as d
    from dreamo_async.testing import FakeDreamOServer, sample_images

    console = Console()
    images = sample_images()
    prompts = [
        "the subject of image 1 as a watercolour postcard",
        "image 1's character exploring a neon city at night",
        "a product shot of the object in image 1 on white marble",
        "the subject of image 1 and image 2 sharing a picnic",
    ]
    requests: list[dict[str, Any]] = []
    for i in range(jobs):
        refs = [images[i % len(images)], images[(i + 1) % len(images)]][: 1 + i % 2]
        prompt = prompts[i % len(prompts)]
        if i in (jobs // 3, 2 * jobs // 3):
            prompt += " [fail:003013095]"  # scripted failures show the error path
        requests.append(
            {"prompt": prompt, "images": refs, "seed": i, "ref_types": ["IP"] * len(refs)}
        )

    console.print(
        f"[bold]dreamo demo[/bold]: {jobs} jobs against the built-in fake service "
        f"(max_concurrency={concurrency}, {rps:g} requests/s, ~{task_ms} ms per task; "
        f"2 jobs are scripted to fail)"
    )
    failures: Counter[str] = Counter()
    cost = Decimal(0)
    completed = 0
    started = time.perf_counter()
    async with FakeDreamOServer(
        api_key="demo-key", task_duration_ms=task_ms, report_progress=True
    ) as server:
        poll = d.PollPolicy(initial_delay=0.2, max_delay=1.0, timeout=60)
        async with d.DreamOClient(
            api_key="demo-key",
            base_url=server.url,
            max_concurrency=concurrency,
            requests_per_second=rps,
            burst=2,
            poll=poll,
        ) as client:
            with Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            ) as progress:
                bar = progress.add_task("generating", total=jobs)
                async for item in client.generate_many(requests):
                    progress.advance(bar)
                    if item.result is not None:
                        completed += 1
                        cost += item.result.cost or 0
                        if not console.is_terminal:
                            console.print(f"job {item.index:>3} done: {item.result.image_urls[0]}")
                    else:
                        error = item.error
                        code = getattr(error, "code", None) or type(error).__name__
                        failures[str(code)] += 1
                        console.print(f"job {item.index:>3} [red]failed[/red]: {error}")
        stats = server.stats
    elapsed = time.perf_counter() - started

    table = Table(title="summary", show_header=False)
    table.add_row("jobs", str(jobs))
    table.add_row("completed", str(completed))
    table.add_row("failed", ", ".join(f"{n} × {c}" for c, n in failures.items()) or "0")
    table.add_row("total cost", f"${cost}")
    table.add_row("wall time", f"{elapsed:.1f} s")
    table.add_row("creates at the server", str(stats.creates))
    table.add_row("polls at the server", str(stats.polls))
    console.print(table)
    return 0 if completed + sum(failures.values()) == jobs else 1
