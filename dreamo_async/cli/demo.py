"""``dreamo demo``: the batch engine against the built-in fake service (no key, no network)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.console import Console

from .batch_run import run_batch_ui
from .options import RATE, RateValue, Service, out_option
from .running import EXIT_FAILED, EXIT_OK, run

__all__ = ["demo"]

_PROMPTS = (
    "the subject of image 1 as a watercolour postcard",
    "image 1's character exploring a neon city at night",
    "a product shot of the object in image 1 on white marble",
    "the subject of image 1 and image 2 sharing a picnic",
)
#: The error code of the demo's scripted failures.
_SCRIPTED = "003013095"


def _rate_text(rps: RateValue) -> str:
    return f"{rps:g}" if isinstance(rps, float) else str(rps)


@click.command()
@click.option("--jobs", type=click.IntRange(1, 10_000), default=24, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 512), default=6, show_default=True)
@click.option("--rps", type=RATE, default=20.0, show_default=True)
@click.option(
    "--task-ms",
    type=click.FloatRange(0),
    default=1500,
    show_default=True,
    help="Simulated generation time (ms).",
)
@out_option("Keep the images here (default: a temporary folder, removed at the end).", check=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo(
    jobs: int,
    concurrency: int,
    rps: RateValue,
    task_ms: float,
    out: Path | None,
    as_json: bool,
) -> None:
    """The batch engine against the built-in fake service (no key, no network)."""

    async def go() -> int:
        # Imported here: the library never imports its test seam; only this command does.
        from dreamo_async.batch import BatchJob
        from dreamo_async.testing import FakeDreamOServer, sample_images

        images = [Path(p) for p in sample_images()]
        batch = []
        for i in range(jobs):
            refs = [images[i % len(images)], images[(i + 1) % len(images)]][: 1 + i % 2]
            prompt = _PROMPTS[i % len(_PROMPTS)]
            if jobs > 2 and i in (jobs // 3, 2 * jobs // 3):
                prompt += f" [fail:{_SCRIPTED}]"  # scripted failures show the error path
            params = {
                "prompt": prompt,
                "images": list(refs),
                "seed": i,
                "ref_types": ["IP"] * len(refs),
            }
            batch.append(BatchJob(index=i, params=params, line=i + 1, source="<demo>"))
        Console(stderr=True, highlight=False).print(
            f"[bold]dreamo demo[/bold]: {jobs} jobs against the built-in fake service "
            f"(concurrency {concurrency}, {_rate_text(rps)} requests/s, ~{task_ms:g} ms per "
            f"task; {2 if jobs > 2 else 0} jobs are scripted to fail)"
        )
        with tempfile.TemporaryDirectory(prefix="dreamo-demo-") as scratch:
            folder = out or Path(scratch)
            async with FakeDreamOServer(
                api_key="demo-key", task_duration_ms=task_ms, report_progress=True
            ) as server:
                service = Service(base_url=server.url, poll_interval=0.2, timeout=60)
                client = service.client(api_key="demo-key", concurrency=concurrency, rps=rps)
                kept = {} if out else {
                    "results": "in a temporary folder (keep them with --out DIR)",
                    "journal": "in the same temporary folder",
                }  # fmt: skip
                async with client:
                    code, report = await run_batch_ui(
                        client,
                        batch,
                        folder,
                        folder / "dreamo-journal.db",
                        concurrency=concurrency,
                        retry_unknown=False,
                        retry_failed=False,
                        as_json=as_json,
                        extra_rows=lambda: {
                            **kept,
                            "creates at the server": str(server.stats.creates),
                            "polls at the server": str(server.stats.polls),
                            "downloads": str(server.stats.downloads),
                        },
                    )
        # Two failures are scripted: the demo succeeds when exactly those failed.
        scripted = {_SCRIPTED: 2} if jobs > 2 else {}
        if code == EXIT_FAILED and report.failed == scripted:
            return EXIT_OK
        return code

    hint = "the demo ran against the built-in fake service only; nothing real was sent"
    run(go, lambda: hint, as_json=as_json)
