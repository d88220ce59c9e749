"""Helpers shared by several test modules and by benchmarks/ (so no pytest here).

``client_for``: the client of test_concurrency and test_ratelimit (fast polls and
retries); test_client and test_batch keep their own, which differ.

Pytest-bound helpers (``eventually``, ``landed``) stay in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer

KEY = "test-key"
FAST_POLL = d.PollPolicy(initial_delay=0.01, max_delay=0.02, jitter=0.0, timeout=20)


def client_for(server: FakeDreamOServer, **options: Any) -> d.DreamOClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", d.RetryPolicy(initial_delay=0.01, max_delay=0.02))
    return d.DreamOClient(api_key=KEY, base_url=server.url, **options)


@contextlib.asynccontextmanager
async def threaded_fake_server(**options: Any) -> AsyncIterator[FakeDreamOServer]:
    """A FakeDreamOServer on its own event loop in a thread (read its stats afterwards)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeDreamOServer(api_key=KEY, **options)
    try:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.start(), loop))
        yield server
    finally:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.close(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()


def task_state(task: asyncio.Task[Any]) -> str:
    """What an asyncio task is doing, for a failure message: running, done, cancelled
    or the exception it ended with."""
    if not task.done():
        return "running"
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    return "done" if error is None else repr(error)
