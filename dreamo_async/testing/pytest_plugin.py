"""pytest plugin (registered through the ``pytest11`` entry point): FakeDreamOServer fixtures.

``dreamo_server`` is a started server with fast timings (key ``test-key``, 20 ms
tasks); ``dreamo_server_factory`` starts servers with any options and closes them
all after the test::

    async def test_envelope(dreamo_server_factory):
        server = await dreamo_server_factory(envelope=True, api_key=None)

Both are async fixtures, so they need pytest-asyncio; without it this plugin
registers nothing (and costs nothing beyond this import attempt).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from .server import FakeDreamOServer

__all__ = ["FAST_OPTIONS", "ServerFactory"]

#: Options of ``dreamo_server`` (and defaults of the factory): fast but still observable.
FAST_OPTIONS: dict[str, Any] = {"api_key": "test-key", "task_duration_ms": 20}


class ServerFactory(Protocol):
    """``await factory(**options)`` -> a started FakeDreamOServer, closed after the test."""

    async def __call__(self, **options: Any) -> FakeDreamOServer: ...


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - plugin inactive without pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def dreamo_server_factory() -> AsyncIterator[ServerFactory]:
        """Start FakeDreamOServers with custom options; all are closed after the test."""
        started: list[FakeDreamOServer] = []

        async def factory(**options: Any) -> FakeDreamOServer:
            server = FakeDreamOServer(**{**FAST_OPTIONS, **options})
            await server.start()
            started.append(server)
            return server

        try:
            yield factory
        finally:
            for server in reversed(started):
                await server.close()

    @pytest_asyncio.fixture
    async def dreamo_server(dreamo_server_factory: ServerFactory) -> FakeDreamOServer:
        """A started FakeDreamOServer (key ``test-key``, 20 ms tasks)."""
        return await dreamo_server_factory()
