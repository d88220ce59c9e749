"""The connection-level rules of paced requests: a second rate slot per new connection,
and no silent re-send by aiohttp of a request no rate slot paid for."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Final

import aiohttp
from aiohttp.connector import Connection

from .coordination import Priority, RateLimiter

__all__ = ["NO_SILENT_RESEND", "PACING", "ConnectionLost", "PacedConnector"]

#: The limiter of the request being sent by this asyncio task (see PacedConnector).
PACING: Final[contextvars.ContextVar[RateLimiter | None]] = contextvars.ContextVar(
    "dreamo_async_pacing", default=None
)
#: Getting a connection slower than this means a new TCP connection was made.
_NEW_CONNECTION_S: Final = 0.002


class PacedConnector(aiohttp.TCPConnector):
    """A connector that takes a second rate slot when it had to open a new connection.

    The rate slot is taken before the request (so polls can go ahead of creates).
    A pooled connection is handed over at once and the request leaves right after
    its slot; a new one takes a connect round trip, so the request would land at
    the service late, bunched with the ones paced after it. Waiting for a fresh
    slot once the connection is up keeps the service's view of every 1-s window
    within ``rate + burst`` (it costs one slot per new connection, not per request).
    """

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        limiter = PACING.get()
        if limiter is None:
            return await super().connect(req, traces, timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        connection = await super().connect(req, traces, timeout)
        if loop.time() - started > _NEW_CONNECTION_S:
            try:
                await limiter.acquire(Priority.POLL)
            except BaseException:
                connection.close()
                raise
        return connection


async def _no_silent_resend(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Turn a dropped pooled connection into an error of our own (a client middleware).

    aiohttp re-sends an idempotent request once on a new connection when the server
    drops a pooled one, a request no rate slot paid for. Raised as
    :class:`ConnectionLost` it reaches our retry loop instead, which takes a slot.
    """
    try:
        return await handler(request)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc


class ConnectionLost(aiohttp.ClientConnectionError):
    """The connection was lost mid-request (see :func:`_no_silent_resend`)."""


#: The middlewares of a paced poll.
NO_SILENT_RESEND: Final = (_no_silent_resend,)
