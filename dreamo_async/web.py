"""Cancel a job when the HTTP caller that asked for it goes away (Starlette/FastAPI, aiohttp.web).

A handler that awaits ``generate`` for a caller who hung up would keep polling and
hold a job slot for nobody. ASGI servers never cancel such a handler, and aiohttp.web
does so only with ``handler_cancellation=True``; :func:`cancel_on_disconnect` watches
the connection itself and cancels the job, so its polling stops and its slot goes to
the next caller::

    result = await d.cancel_on_disconnect(request, client.generate(prompt=..., images=...))

Neither framework is imported until a request of its kind is seen: this module loads
without Starlette, and without importing ``aiohttp.web``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from aiohttp.web import BaseRequest
    from starlette.requests import Request as StarletteRequest

__all__ = ["CallerDisconnectedError", "cancel_on_disconnect"]

T = TypeVar("T")

#: How often an aiohttp.web connection is checked for a caller that left (seconds).
AIOHTTP_CHECK_INTERVAL = 0.25


class CallerDisconnectedError(Exception):
    """The HTTP caller went away before the job ended, so the job was cancelled.

    Not a :class:`~dreamo_async.DreamOError`: it is about your caller, not the
    service, and says nothing of the job's money (a task may already exist; with
    the job cancelled nobody polls it). Answer with any status: nobody reads it.
    """


async def cancel_on_disconnect(
    request: StarletteRequest | BaseRequest,
    work: Awaitable[T],
    *,
    check_interval: float = AIOHTTP_CHECK_INTERVAL,
) -> T:
    """Await ``work``; if the caller of ``request`` leaves first, cancel it.

    Raises :class:`CallerDisconnectedError` once ``work`` has been cancelled and
    has finished. A result that arrives as the caller leaves is still returned
    (it is paid for). ``request`` is a Starlette/FastAPI ``Request`` (the server's
    ``http.disconnect`` message is watched; the body is read first and stays
    available through ``request.body()``) or an aiohttp.web request (its transport
    is checked every ``check_interval`` seconds). If the handler itself is
    cancelled, ``work`` is cancelled too and the cancellation propagates.
    """
    try:
        if check_interval <= 0:
            raise ValueError(f"check_interval must be positive, got {check_interval!r}")
        watcher = _watcher(request, check_interval)
    except (TypeError, ValueError):
        if inspect.iscoroutine(work):
            work.close()  # never started: no "coroutine was never awaited" warning
        raise
    return await _race(work, watcher)


def _watcher(request: Any, check_interval: float) -> Awaitable[None]:
    from aiohttp import web  # a dependency; only its web part is imported lazily

    if isinstance(request, web.BaseRequest):
        return _until_aiohttp_gone(request, check_interval)
    try:
        from starlette.requests import Request
    except ImportError:  # pragma: no cover - depends on what is installed
        pass
    else:
        if isinstance(request, Request):
            return _until_asgi_gone(request)
    raise TypeError(
        "cancel_on_disconnect() takes a Starlette/FastAPI Request or an aiohttp.web "
        f"request, not {type(request).__name__}"
    )


async def _until_asgi_gone(request: StarletteRequest) -> None:
    from starlette.requests import ClientDisconnect

    try:
        await request.body()  # cached by Starlette: watching below never eats the body
    except ClientDisconnect:
        return
    except RuntimeError:  # the handler streamed the body already: nothing left to read
        pass
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_aiohttp_gone(request: BaseRequest, check_interval: float) -> None:
    # aiohttp.web has no public "connection lost" signal; a lost connection's
    # transport is dropped (None) or closing.
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(check_interval)


async def _race(work: Awaitable[T], until_gone: Awaitable[None]) -> T:
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_gone)
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the handler itself is cancelled (server shutdown, aiohttp)
        watcher.cancel()
        job.cancel()  # a no-op when the job has finished
        await asyncio.wait({job, watcher})
    if job.cancelled():
        if not watcher.cancelled() and (error := watcher.exception()) is not None:
            raise error  # the framework failed while watching: say so, not "disconnected"
        raise CallerDisconnectedError("the HTTP caller went away; the job was cancelled")
    return job.result()
