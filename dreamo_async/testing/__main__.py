"""``python -m dreamo_async.testing``: run FakeDreamOServer standalone (another process).

Prints ``READY <url>`` on one line once listening; counters at ``GET /_fake/stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from .server import FakeDreamOServer


async def _serve(args: argparse.Namespace) -> None:
    server = FakeDreamOServer(
        api_key=args.api_key,
        port=args.port,
        task_duration_ms=args.task_duration_ms,
        rate_limit=args.rate_limit,
        report_progress=args.progress,
    )
    await server.start()
    print(f"READY {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamo_async.testing")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--task-duration-ms", type=float, default=100.0)
    parser.add_argument("--rate-limit", type=float, default=None)
    parser.add_argument("--progress", action="store_true")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
