"""``python -m dreamo_async.testing``: run FakeDreamOServer standalone (another process).

For crash, multi-process and example-app tests that need the service outside the
test's own event loop. Prints exactly one line ``READY <url>`` (flushed) once
listening, so a parent process can wait for it; counters are at
``GET <url>/_fake/stats``, faults are injected with ``POST <url>/_fake/inject``.
Stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from .server import FakeDreamOServer


async def _serve(args: argparse.Namespace) -> None:
    server = FakeDreamOServer(
        api_key=args.api_key or None,
        host=args.host,
        port=args.port,
        task_duration_ms=args.task_duration_ms,
        queue_ms=args.queue_ms,
        rate_limit=args.rate_limit,
        max_open_tasks=args.max_open_tasks,
        report_progress=args.progress,
        envelope=args.envelope,
        cost_per_image=args.cost_per_image,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises instead
            loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"READY {server.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until a signal arrives."""
    parser = argparse.ArgumentParser(
        prog="python -m dreamo_async.testing",
        description="Run the fake Spark DreamO service (for tests and demos).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (default)")
    parser.add_argument(
        "--api-key", default="test-key", help='accepted bearer key; "" accepts any key'
    )
    parser.add_argument("--task-duration-ms", type=float, default=100.0)
    parser.add_argument("--queue-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=float, default=None, help="requests/s per server")
    parser.add_argument("--max-open-tasks", type=int, default=None)
    parser.add_argument("--progress", action="store_true", help="report progress 0..1")
    parser.add_argument("--envelope", action="store_true", help='wrap answers in {"data"}')
    parser.add_argument("--cost-per-image", default=None, help='price tasks per image, "0.01"')
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
