"""Shared test helpers. Fixtures of the fake server come from the dreamo_async pytest plugin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer

from .redis_server import RedisServer, require_redis_binary

if TYPE_CHECKING:
    import redis.asyncio as aioredis


#: Checks ``eventually`` still makes once its deadline has passed, before it fails.
_CHECKS_AFTER_DEADLINE = 100


async def eventually(
    condition: Callable[[], bool],
    *,
    timeout: float = 5.0,
    describe: Callable[[], str] | None = None,
) -> None:
    """Wait until ``condition()`` holds (checked every 2 ms); fail after ``timeout``.

    Once the deadline has passed it still checks a hundred times (0.2 s of the loop's
    own turns): a process stalled past the deadline by a busy machine would otherwise
    fail at its first check, before its loop has had a turn to do what the condition
    waits for. ``describe()`` says what was seen instead, in the failure.
    """
    deadline = time.monotonic() + timeout
    late_checks = 0
    while not condition():
        if time.monotonic() > deadline:
            late_checks += 1
            if late_checks > _CHECKS_AFTER_DEADLINE:
                seen = f": {describe()}" if describe is not None else ""
                raise AssertionError(f"condition not reached in time{seen}")
        await asyncio.sleep(0.002)


async def landed() -> None:
    """Let requests already written reach a fake server on this loop before counting them.

    Cancelling a job may catch a request after its bytes left: it was sent before the
    cancellation, and the server (same loop) has yet to read it. 20 ms covers that.
    """
    await asyncio.sleep(0.02)


async def assert_no_more_requests(server: FakeDreamOServer, quiet: float = 0.1) -> None:
    """After a cancellation: no request reaches ``server`` during ``quiet`` seconds.

    Requests written before the cancellation are let land first (:func:`landed`).
    """
    await landed()
    seen = server.stats.requests
    await asyncio.sleep(quiet)
    assert server.stats.requests == seen


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees a developer's real key, and testing mode never leaks between tests."""
    monkeypatch.delenv("DREAMO_API_KEY", raising=False)
    monkeypatch.delenv("VTRIX_API_KEY", raising=False)
    yield
    d.set_testing(False)


@pytest.fixture
def journal_fails_at_created(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every journal write of the ``created`` state fails, as a full or broken disk would:
    the moment a task exists but its id cannot be kept."""
    from dreamo_async.batch import Journal, JournalError

    real = Journal.aupdate

    async def failing(self: Journal, index: int, state: Any, **fields: Any) -> None:
        if state == "created":
            raise JournalError("journal write failed: disk I/O error")
        await real(self, index, state, **fields)

    monkeypatch.setattr(Journal, "aupdate", failing)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free loopback port (skipped without one)."""
    server = RedisServer(require_redis_binary())
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def inspect(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at what the scripts wrote."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
