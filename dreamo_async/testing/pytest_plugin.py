"""pytest plugin (registered through the ``pytest11`` entry point): FakeDreamOServer fixtures.

``dreamo_server`` is a started server with fast timings; ``dreamo_server_factory``
starts servers with any options and closes them after the test. Both need
pytest-asyncio; without it the plugin registers nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - plugin inactive without pytest-asyncio
    pytest_asyncio = None  # type: ignore[assignment]

from .server import FakeDreamOServer

ServerFactory = Callable[..., Awaitable[FakeDreamOServer]]

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def dreamo_server_factory() -> AsyncIterator[ServerFactory]:
        """Start FakeDreamOServers with custom options; all are closed after the test."""
        started: list[FakeDreamOServer] = []

        async def factory(**options: Any) -> FakeDreamOServer:
            options.setdefault("task_duration_ms", 20)
            server = FakeDreamOServer(**options)
            await server.start()
            started.append(server)
            return server

        yield factory
        for server in started:
            await server.close()

    @pytest_asyncio.fixture
    async def dreamo_server(dreamo_server_factory: ServerFactory) -> FakeDreamOServer:
        """A started FakeDreamOServer (key ``test-key``, 20 ms tasks)."""
        return await dreamo_server_factory()
