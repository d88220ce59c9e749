"""The ``dreamo`` command group: every command registered on it."""

from __future__ import annotations

import click

from .batch_run import batch
from .demo import demo
from .tasks import generate, status, wait_cmd

__all__ = ["cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dreamo_async")
def cli() -> None:
    """Generate images with Spark DreamO (Multi-IP) from the command line.

    Key: env DREAMO_API_KEY or VTRIX_API_KEY, or --api-key-file. Exit codes:
    0 all done, 1 some jobs failed, 2 usage/input error (nothing sent), 3 service
    unreachable or key refused, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    """


for command in (generate, status, wait_cmd, batch, demo):
    cli.add_command(command)
